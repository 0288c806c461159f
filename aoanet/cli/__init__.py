"""The training side's commands (aoanet-train, aoanet-eval, aoanet-data, aoanet-convert).

Importing a command tunes Paddle's math library for this CPU before Paddle is loaded, and the process's memory
allocator (``aoanet.cpu``); the library modules themselves leave the environment alone.
"""

from aoanet.cpu import configure_allocator, configure_math_library

configure_math_library()
configure_allocator()
