"""What the Horovod data-parallel runners of both frameworks share.

Every rank is a replica holding the whole model; rank 0 logs and saves. The
subclasses (train_torch/data_parallel.py, train_tf/data_parallel.py) supply
the framework's Horovod module, model, optimizer and checkpoint module; the
methods here only use Horovod's framework-neutral calls.
"""

from common.plan import make_plan


class HorovodDataParallel:
    checkpoints = None  # the framework's checkpoint module (write/EXTENSION)

    def set_layout(self, hvd, config):
        self.hvd = hvd
        self.rank, self.world_size = hvd.rank(), hvd.size()
        self.plan = make_plan(config, self.world_size)
        self.primary = self.rank == 0  # Horovod: rank 0 alone logs and saves.
        self.data_shards, self.data_shard = self.world_size, self.rank

    @property
    def checkpoint_extension(self):
        return self.checkpoints.EXTENSION

    def broadcast_object(self, value, name):
        return self.hvd.broadcast_object(value, root_rank=0, name=name)

    def gather_state(self):
        return None  # every rank holds the whole model; rank 0 saves its own

    def save_checkpoint(self, path, position, architecture, state):
        self.checkpoints.write(path, position, self.model, self.optimizer, self.config, architecture)
