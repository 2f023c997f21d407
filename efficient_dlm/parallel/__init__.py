"""Scale-out, the low-level layer: mesh from the `mesh` section, logical-axis rules, sharded init/load,
multi-host, TPU slice descriptions. Imports nothing above models; the AOT tool is efficient_dlm/aot/."""
