"""benchmarks/overhead.py: the paired, randomised measurement and its JSON (logic only; no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import TEXT_DIM, flux_inputs, tiny_flux

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def overhead():
    spec = importlib.util.spec_from_file_location("overhead_bench", ROOT / "benchmarks" / "overhead.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["overhead_bench"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("overhead_bench", None)


class FakeClock:
    """A clock that moves only when a timed function says so, so wall and CPU seconds are exact."""

    def __init__(self):
        self.wall = 0.0
        self.cpu = 0.0
        self.log = []

    def spend(self, wall: float, cpu: float):
        def fn():
            self.wall += wall
            self.cpu += cpu
            self.log.append(fn)

        return fn


def _pairs(clock: FakeClock):
    plain_a, ours_a = clock.spend(1.0, 2.0), clock.spend(1.5, 2.5)
    plain_b, ours_b = clock.spend(2.0, 4.0), clock.spend(2.2, 4.8)
    names = {plain_a: ("a", "plain"), ours_a: ("a", "ours"), plain_b: ("b", "plain"), ours_b: ("b", "ours")}
    return {"a": (plain_a, ours_a), "b": (plain_b, ours_b)}, names


def test_paired_rounds_pairs_randomises_and_skips_warmup(overhead):
    clock = FakeClock()
    pairs, names = _pairs(clock)
    rounds, warmup = 9, 3
    rec = overhead.paired_rounds(
        pairs, rounds, warmup, seed=5, wall=lambda: clock.wall, cpu=lambda: clock.cpu, collect=False
    )
    calls = [names[fn] for fn in clock.log]
    assert len(calls) == 2 * 2 * (rounds + warmup)  # warm-up rounds ran ...
    for name in "ab":
        r = rec[name]
        assert len(r["plain_wall"]) == len(r["ours_wall"]) == len(r["plain_cpu"]) == len(r["ours_cpu"]) == rounds
        assert r["plain_wall"] == [pytest.approx({"a": 1.0, "b": 2.0}[name])] * rounds  # ... and are not recorded
        assert r["ours_cpu"] == [pytest.approx({"a": 2.5, "b": 4.8}[name])] * rounds
        # balanced order: ours first in half the rounds (the odd one either way)
        assert sum(r["ours_first"]) in (rounds // 2, rounds // 2 + 1)
        assert 0 < sum(r["ours_first"]) < rounds
    # each pair's two sides run back to back, in the recorded order
    pairs_seen = [calls[i : i + 2] for i in range(0, len(calls), 2)]
    for first, second in pairs_seen:
        assert first[0] == second[0] and {first[1], second[1]} == {"plain", "ours"}
    recorded = pairs_seen[2 * warmup :]
    for name in "ab":
        firsts = [p[0][1] == "ours" for p in recorded if p[0][0] == name]
        assert firsts == rec[name]["ours_first"]
    # the pairs' order within a round is shuffled, not fixed
    positions = rec["a"]["position"]
    assert set(positions) == {0, 1}


def test_paired_rounds_is_reproducible_from_its_seed(overhead):
    def orders(seed):
        clock = FakeClock()
        pairs, _ = _pairs(clock)
        rec = overhead.paired_rounds(
            pairs, 8, 1, seed=seed, wall=lambda: clock.wall, cpu=lambda: clock.cpu, collect=False
        )
        return [(rec[n]["ours_first"], rec[n]["position"]) for n in "ab"]

    assert orders(3) == orders(3)
    assert any(orders(3) != orders(s) for s in range(4, 10))


def test_ratio_stats_are_of_per_round_ratios(overhead):
    # ratio of medians (4/2 = 2.0) and median of ratios (1.5) differ here: the statistic is the latter
    stats = overhead.ratio_stats(plain=[1.0, 2.0, 4.0], ours=[1.5, 4.0, 4.0])
    assert stats["ratios"] == [1.5, 2.0, 1.0]
    assert stats["ratio_median"] == 1.5
    assert stats["ratio_min"] == 1.0 and stats["ratio_max"] == 2.0
    assert stats["ratio_q1"] == 1.25 and stats["ratio_q3"] == 1.75
    assert stats["plain_median_s"] == 2.0 and stats["ours_median_s"] == 4.0


def test_balanced_orders(overhead):
    import random

    for rounds in range(0, 12):
        orders = overhead.balanced_orders(rounds, random.Random(rounds))
        assert len(orders) == rounds and rounds // 2 <= sum(orders) <= (rounds + 1) // 2


def _tiny_config(overhead, build=None):
    return overhead.Config(
        cls="FluxTransformer2DModel",
        model={"tiny": True},
        build=build or tiny_flux,
        inputs=lambda batch: flux_inputs(batch=batch, h=4, w=4, text=5),
        text_dim=TEXT_DIM,
        image_tokens=16,
        text_tokens=5,
        layers=(1,),
    )


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: no waiting on a second thread of a busy machine
    yield
    torch.set_num_threads(threads)


def test_measure_writes_every_field(overhead, one_thread):
    args = overhead.parse_args(["--repeats", "3", "--warmup", "1", "--seed", "7", "--concepts", "3"])
    out = overhead.measure("tiny", _tiny_config(overhead), args)
    out = json.loads(json.dumps(out))  # plain JSON
    for key in ("config", "class", "device", "dtype", "torch_threads", "torch", "repeats", "warmup", "seed", "method"):
        assert key in out
    assert (out["config"], out["repeats"], out["warmup"], out["seed"]) == ("tiny", 3, 1, 7)
    assert (
        set(out["summary"])
        == set(out["comparisons"])
        == {
            "forward",
            "forward_all_double_layers",
            "real_image_pass",
            "real_image_pass_vs_all_double_blocks",
        }
    )
    for name, comp in out["comparisons"].items():
        assert out["summary"][name] == {"wall": comp["wall"]["ratio_median"], "cpu": comp["cpu"]["ratio_median"]}
        for clock in ("wall", "cpu"):
            s = comp[clock]
            assert len(s["ratios"]) == 3
            assert s["ratio_min"] <= s["ratio_q1"] <= s["ratio_median"] <= s["ratio_q3"] <= s["ratio_max"]
            assert s["plain_median_s"] > 0 and s["ours_median_s"] > 0
    assert out["comparisons"]["forward"]["layers"] == [1]
    assert out["comparisons"]["forward_all_double_layers"]["layers"] == [0, 1, 2]
    assert out["comparisons"]["real_image_pass"]["concepts"] == 7
    assert out["encode_throughput"]["noise_samples_per_image"] == 5
    assert out["encode_throughput"]["images_per_second"] > 0
    assert "peak_memory_bytes" not in out  # CUDA only


def test_unsupported_class_is_one_line_error(overhead, capsys, monkeypatch):
    def not_an_mmdit():
        return torch.nn.Sequential(torch.nn.Linear(2, 2))

    cfg = overhead.Config(**{**_tiny_config(overhead, build=not_an_mmdit).__dict__, "cls": "Sequential"})
    monkeypatch.setitem(overhead.CONFIGS, "not-mmdit", cfg)
    code = overhead.main(["--config", "not-mmdit", "--repeats", "1", "--warmup", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("overhead.py: error: config 'not-mmdit'") and "Sequential" in err[0]


def test_table_rows_name_real_diffusers_classes(overhead):
    import diffusers

    sizes = {cfg.size for cfg in overhead.CONFIGS.values()}
    assert sizes == {"cpu", "gpu"}
    for name, cfg in overhead.CONFIGS.items():
        assert hasattr(diffusers, cfg.cls), (name, cfg.cls)
    for cls in (
        "FluxTransformer2DModel",
        "SD3Transformer2DModel",
        "Flux2Transformer2DModel",
        "QwenImageTransformer2DModel",
        "ChromaTransformer2DModel",
        "HunyuanImageTransformer2DModel",
        "AuraFlowTransformer2DModel",
    ):
        assert any(c.cls == cls and c.size == "cpu" for c in overhead.CONFIGS.values()), cls
