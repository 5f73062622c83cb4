import os

# Tests run on the CPU unless told otherwise; several host devices let the shard tests build a mesh.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
