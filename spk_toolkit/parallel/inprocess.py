"""The in-process executor: this process builds (or is given) the model and runs every shard itself."""
from __future__ import annotations

from spk_toolkit.parallel import Executor, register_executor


@register_executor
class InProcessExecutor(Executor):
    """All shards in plan order in this process, one DataLoader across shard boundaries (the default)."""

    name = "inprocess"

    def start(self) -> None:
        if self.model is None:
            from spk_toolkit.backends.base import load_model

            self.model = load_model(self.toolkit, **self.model_kwargs)

    def model_info(self) -> dict:
        return self.model.describe()

    def run(self, plan, shard_ids, output_dir, opts, on_progress=None):
        from spk_toolkit.engine.run import run_shards

        yield from run_shards(plan, shard_ids, self.model, output_dir, opts, on_progress=on_progress)

    def info(self) -> dict:
        return {"executor": "in-process", "world_size": 1}
