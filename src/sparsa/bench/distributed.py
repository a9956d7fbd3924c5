"""Run benchmark cells as Ray tasks: one actor per GPU (or a few CPU actors), each holding the model once.

Rows go through the same resumable JSONL as local runs, appended by the driver as cells finish. Dense cells
run first (a wave of their own) so every method row can carry the dense score of the same samples.
"""

from __future__ import annotations

from pathlib import Path

from .runner import Cell, _dense_key, append_row, evaluate_cell, load_model


class CellWorker:
    def __init__(self, model_dir: str, device: str, dtype: str | None, batch_size: int):
        self.model, self.tokenizer = load_model(Path(model_dir), device, dtype)
        self.device, self.batch_size = device, batch_size

    def run(self, cell: Cell, model_name: str, n: int, seed: int, dense_row: dict | None) -> dict:
        done = {} if dense_row is None else {dense_row["key"]: dense_row}
        return evaluate_cell(self.model, self.tokenizer, cell, model_name, n, seed, self.device, self.batch_size,
                             done)


def run_cells_ray(todo, done, path, model_name, n, seed, out, device, dtype, batch_size, address, progress,
                  max_cpu_workers: int = 2):
    if not todo:
        return
    import ray
    from ray.util import ActorPool
    from tqdm.auto import tqdm

    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False) if address else \
            ray.init(ignore_reinit_error=True, log_to_driver=False, include_dashboard=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus:
        worker_cls, count, device = ray.remote(num_gpus=1)(CellWorker), gpus, "cuda"
    else:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        worker_cls, count = ray.remote(num_cpus=1)(CellWorker), max(1, min(max_cpu_workers, cpus, len(todo)))
    actors = [worker_cls.remote(str(path), device, dtype, batch_size) for _ in range(count)]
    bar = tqdm(total=len(todo), desc="sparsa bench (ray)", unit="cell", disable=not progress)
    for wave in ([c for c in todo if c.method.baseline], [c for c in todo if not c.method.baseline]):
        pool = ActorPool(actors)
        submit = lambda actor, cell: actor.run.remote(  # noqa: E731
            cell, model_name, n, seed, done.get(_dense_key(cell, model_name, n, seed)))
        for row in pool.map_unordered(submit, wave):
            append_row(out, row)
            done[row["key"]] = row
            bar.update(1)
    bar.close()
    for actor in actors:
        ray.kill(actor)
