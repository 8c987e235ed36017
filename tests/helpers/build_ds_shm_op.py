"""Builds DeepSpeed's CPU shared-memory allreduce op (what a gloo world's first start compiles), for
tests/train/conftest.py's session fixture: `python tests/helpers/build_ds_shm_op.py`."""

from deepspeed.ops.op_builder.cpu.comm import ShareMemCommBuilder

if __name__ == "__main__":
    ShareMemCommBuilder().load(verbose=False)
