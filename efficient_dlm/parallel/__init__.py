"""Scale-out: mesh from config, logical-axis rules, sharded init/load, multi-host, AOT on TPU topologies."""
