"""The built-in allocators of owca-allocate.

BUILTINS is their one list; owca-allocate declares it to the configuration loader,
which imports an allocator's module only when a configuration names its tag.
"""
BUILTINS = {
    "NOPAllocator": "owca.plugin:NOPAllocator",
    "StaticAllocator": "owca.allocate.allocators.static:StaticAllocator",
    "StaticRule": "owca.allocate.allocators.static:StaticRule",
    "SloController": "owca.allocate.allocators.slo_controller:SloController",
    "SloRdt": "owca.allocate.allocators.slo_controller:SloRdt",
    "MemoryProtection": "owca.allocate.allocators.memory_protection:MemoryProtection",
}
