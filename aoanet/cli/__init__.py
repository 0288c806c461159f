"""The training side's commands (aoanet-train, aoanet-eval, aoanet-data, aoanet-convert).

Importing a command tunes Paddle's math library for this CPU before Paddle is loaded, and the process's memory
allocator (``aoanet.cpu``); the library modules themselves leave the environment alone.
"""

import warnings

from aoanet.cpu import configure_allocator, configure_math_library

configure_math_library()
configure_allocator()
# Paddle warns at import when ccache is missing (it matters only for compiling custom operators): noise before a
# command's own output.
warnings.filterwarnings("ignore", message="No ccache found", category=UserWarning)
