"""Tiny runs of both benchmark scripts (minimal sizes) so they cannot rot, and the CRF pipelining
of the evaluation loop that eval_bench measures. No timing is asserted."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, make_module

PHASES = ("data_ms", "backbone_ms", "heads_loss_ms", "optimiser_ms")


def test_train_bench_runs_and_writes_json(tmp_path):
    out = tmp_path / "train.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_bench", "--patch", "16", "--res", "32", "--batch", "2",
         "--steps", "2", "--warmup", "1", "--device", "cpu", "--no-compile", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "steps/s" in proc.stdout and "cached / optimised" in proc.stdout and "GPU:" in proc.stdout
    results = json.loads(out.read_text())
    assert set(results["configs"]) == {"unoptimised", "optimised", "cached"}
    for config in results["configs"].values():
        assert config["steps_per_s"] > 0 and config["peak_mem_mb"] > 0
        assert config["images_per_s"] == pytest.approx(2 * config["steps_per_s"], rel=1e-2)
        assert config["step_ms"] > 0 and all(config[k] >= 0 for k in PHASES)
    assert results["cache"]["images"] == 4 and results["cache"]["disk_mb"] > 0
    assert results["configs"]["cached"]["backbone_ms"] < results["configs"]["unoptimised"]["backbone_ms"]
    assert results["machine"]["cores"] >= 1 and results["machine"]["cpu"]
    assert results["best_uncached"] == "optimised" and results["settings"]["compile"] is False
    assert set(results["ratios"]) == {"optimised_vs_unoptimised", "cached_vs_unoptimised",
                                      "cached_vs_uncached"}
    assert results["ratios"]["cached_vs_uncached"] == pytest.approx(
        results["configs"]["cached"]["steps_per_s"] / results["configs"]["optimised"]["steps_per_s"],
        rel=1e-2)


def test_train_bench_compiled_row_is_optional():
    from benchmarks import train_bench

    assert train_bench.configs(train_bench.parse_args([])) == ("unoptimised", "optimised", "compiled",
                                                                "cached")
    args = train_bench.parse_args(["--no-compile"])
    assert train_bench.configs(args) == ("unoptimised", "optimised", "cached")
    assert train_bench.best_uncached(args) == "optimised"
    assert train_bench.best_uncached(train_bench.parse_args([])) == "compiled"


def test_eval_bench_runs_and_writes_json(tmp_path, capsys):
    from benchmarks import eval_bench

    out = tmp_path / "eval.json"
    assert eval_bench.main(["--patch", "16", "--images", "3", "--size", "32", "64", "--res", "32",
                            "--batch", "2", "--crf-workers", "1", "--repeats", "1", "--device", "cpu",
                            "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "crf_pipelined" in printed and "GPU:" in printed
    results = json.loads(out.read_text())
    runs = results["runs"]
    assert set(runs) == {"no_crf", "crf_serial", "crf_pipelined", "crf_torch"}
    assert results["settings"]["images"] == 3 and results["same_results"] is True
    for name in ("crf_serial", "crf_pipelined", "crf_torch"):
        assert runs[name]["busy_s"] > 0 and 0 < runs[name]["pool_utilisation"] <= 1.0
        assert runs[name]["peak_mem_mb"] > 0
    assert results["torch_vs_pydensecrf"]["mIoU"] <= 0.05 and "torch CRF vs pydensecrf" in printed


class ListLoader(list):
    """A list of batches that looks like a DataLoader to evaluate()."""

    @property
    def dataset(self):
        return [None] * sum(len(batch["img"]) for batch in self)


class RecordingPool:
    """Stands in for a CRFPool with workers: logs submits and result() calls; the CRF result is
    exp(log-probs), or its argmax with ``labels=True``."""

    num_workers = 2

    def __init__(self, log, finished):
        self.log, self.finished, self.submitted, self.threads = log, finished, 0, []

    def submit(self, images, log_probs, labels=False):
        k, pool = self.submitted, self
        self.submitted += 1
        self.threads.append(torch.get_num_threads())
        self.log.append(("submit", k))
        marginals = [lp.argmax(0).numpy() if labels else lp.exp().numpy() for lp in log_probs]

        class Handle:
            def done(self):
                return pool.finished

            def result(self):
                pool.log.append(("result", k))
                return marginals

        return Handle()

    def busy_workers(self):
        """Both workers busy once a batch is submitted, unless jobs finish at once."""
        return 0 if self.finished or not self.submitted else self.num_workers


@pytest.mark.parametrize("finished", [False, True])
def test_evaluation_pipelines_the_crf(finished):
    """Batch n's CRF is submitted before batch n+1 is computed and consumed in order, never
    before it is done; torch gets every core while no CRF job runs, and only the cores the busy
    CRF workers leave while they run."""
    from smooseg.eval.crf_pool import available_cores
    from smooseg.eval.evaluate import evaluate
    torch.manual_seed(0)
    module = make_module(n_classes=3, patch_size=16)
    log = []
    module.net.backbone.register_forward_hook(  # flip=False: one backbone call per batch
        lambda *_: log.append(("network", sum(e[0] == "network" for e in log))))
    data = [{"img": torch.randn(2, 3, 32, 32), "label": torch.randint(-1, 3, (2, 32, 32))} for _ in range(3)]
    pool = RecordingPool(log, finished)
    before = torch.get_num_threads()
    result, _ = evaluate(module.net, ListLoader(data), module.data, crf_pool=pool, flip=False,
                         show_progress=False)
    assert torch.get_num_threads() == before
    all_cores, beside_two = min(before, available_cores()), max(1, min(before, available_cores() - 2))
    assert pool.threads == [all_cores] * 3 if finished else [all_cores, beside_two, beside_two]
    assert [e for e in log if e[0] != "result"] == [("network", 0), ("submit", 0), ("network", 1),
                                                    ("submit", 1), ("network", 2), ("submit", 2)]
    results = [e[1] for e in log if e[0] == "result"]
    assert results == [0, 1, 2]
    first_result = log.index(("result", 0))
    # unfinished jobs are consumed only after the last batch; finished ones as soon as seen
    assert first_result == (len(log) - 3 if not finished else log.index(("submit", 0)) + 1)
    assert result["crf"] is True and result["mIoU"] == result["nocrf"]["mIoU"]  # CRF = identity here
