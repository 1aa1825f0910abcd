"""The model card (``conceptattention_lab.card``): every training stage, the loss log, the release's choices."""

from __future__ import annotations

import json


def test_model_card_lists_every_training_stage(tiny_dir, tmp_path):
    import shutil

    from conceptattention_lab.card import stage_record, training_minutes, write_card

    # a resumed run: the clock restarts at 0 in the second segment -> 2 + 3 minutes
    assert training_minutes([{"seconds": 60}, {"seconds": 120}, {"seconds": 60}, {"seconds": 180}]) == 5.0
    runs = []
    for i, (steps, init) in enumerate(((40, ""), (20, "shapes"))):
        run = tmp_path / f"run{i}"
        (run / "weights").mkdir(parents=True)
        meta = {
            "config": {"prediction": "sample", "patch": 4, "text_layers": 0} if i else {"patch": 8},
            "steps": steps,
            "train_config": {
                "lr": 0.001 * (i + 1),
                "init_from": init,
                "seed": i,
                "warmup": 5,
                "object_weight": 1.0 + 3 * i,
                **(
                    {
                        "multi_object_rate": 0.5,
                        "reader_weight": 0.05,
                        "reader_blocks": [3, 5],
                        "reader_at": "attention",
                        "concept_weight": 0.02,
                        "coreference_weight": 0.002,
                    }
                    if i
                    else {}
                ),
            },
        }
        (run / "weights" / "config.json").write_text(json.dumps(meta))
        (run / "log.jsonl").write_text(
            "\n".join(json.dumps({"step": s, "loss": 1.0 / s, "seconds": 6.0 * s}) for s in range(10, steps + 1, 10))
        )
        runs.append(stage_record(run, f"train-shapes --out run{i}", "a note" if i == 0 else "", "a GPU" if i else ""))
    weights = tmp_path / "weights"
    shutil.copytree(tiny_dir, weights)
    maps = {
        "images": 1,
        "seed": 7,
        "layers": [1],
        "t": 0.5,
        "samples": 1,
        "concepts": ["circle"],
        "readouts": {
            "concept_attention": {
                "pixel_accuracy": 0.5,
                "miou": 0.4,
                "paper_compatible_miou": 0.33,
                "map": 0.6,
                "shape_pick": 0.7,
            }
        },
    }
    (weights / "MODEL_CARD.md").write_text("# an old card\n\n## Training history (hand-written)\n\nkept by hand\n")
    card = write_card(weights, runs, {"maps": maps, "samples": None}, {"seed": 1}, "a test machine").read_text()
    assert "an old card" not in card and card.endswith("\n## Training history (hand-written)\n\nkept by hand\n")
    assert "| 1 | scratch | 40 | 0.001 |" in card and "| 2 | stage 1 weights | 20 | 0.002 |" in card
    assert (
        "| a test machine | 4 | `train-shapes --out run0`" in card and "| a GPU | 2 | `train-shapes --out run1`" in card
    )
    assert "`train-shapes --out run1`" in card and "Stage 1: a note" in card and "60 steps in 2 stage(s)" in card
    # each stage's reading weight and map objectives (0 and none for a config from before the options), patch
    # size, text layers (2 likewise) and what it predicts
    assert "| 1.0 | 0.0 | 0.0 | 0.0 | 0.0 | none | 8 | 2 | velocity |" in card
    assert (
        "| 4.0 | 0.0 | 0.0 | 0.5 | 0.05 at blocks 3, 5 (attention outputs) | image labels 0.02, co-reference 0.002 "
        "| 4 | 0 | sample |"
    ) in card
    assert "RoPE positions are token indices" not in card  # positions are plain token indices (rope_scale 1)
    assert "prompt tokens' position ids:\n  zeros, as Flux's pipelines pass them;" in card
    assert "| 60 | 0.0500 |" in card  # the second stage's last log line, counted from the first stage
    assert "| 70.0% | n/a |" in card  # a report from before the colour pick existed still renders
    assert (weights / "loss_curve.png").is_file()
    assert "`lab/stages/stageNN.json`" in card and "pip install -e lab" in card
    chosen = {"seed": 1, "concept_attention_by_layers": {"1": {"miou": 0.4, "score": 0.5}}}
    for record, says in (
        ({"colour_plus_shape_accuracy_by_guidance_and_shift": {"6.0,6.0": 1.8}}, "shift together"),
        (
            {"sampler_kept_from_the_previous_release": {"guidance": 6.0, "shift": 6.0}},
            "shift kept from the previous release",
        ),
    ):
        card = write_card(weights, runs, {"maps": maps, "samples": None}, {**chosen, **record}, "a machine").read_text()
        assert f"shape pick and colour pick; the guidance and {says}" in card
        assert card.count("## Training history (hand-written)") == 1  # every rewrite keeps it once


def test_recorded_stages_give_the_card_a_loss_log_without_the_run_directories(tiny_dir, tmp_path):
    import shutil

    from conceptattention_lab.card import (
        loss_points,
        recorded_stages,
        stage_record,
        write_card,
    )

    log = [{"step": s, "loss": 1.0 / s, "seconds": s} for s in range(1, 252)]
    points = loss_points(log, most=100)  # every third record, and the last
    assert [p[0] for p in points] == list(range(1, 252, 3)) + [251] and points[1] == [4, 0.25]
    assert loss_points([]) == []
    runs = []
    for i, steps in enumerate((40, 20)):
        run = tmp_path / f"run{i}"
        (run / "weights").mkdir(parents=True)
        (run / "weights" / "config.json").write_text(json.dumps({"config": {}, "steps": steps, "train_config": {}}))
        (run / "weights" / "model.safetensors").write_bytes(b"")  # present (only the release script looks)
        (run / "log.jsonl").write_text(
            "\n".join(json.dumps({"step": s, "loss": 1.0 / s, "seconds": 6.0 * s}) for s in range(10, steps + 1, 10))
        )
        runs.append(stage_record(run, f"train-shapes --out run{i}"))
    weights = tmp_path / "weights"
    shutil.copytree(tiny_dir, weights)
    maps = {
        "images": 1,
        "seed": 7,
        "layers": [1],
        "t": 0.5,
        "samples": 1,
        "concepts": ["circle"],
        "readouts": {
            "concept_attention": {
                "pixel_accuracy": 0.5,
                "miou": 0.4,
                "paper_compatible_miou": 0.3,
                "map": 0.6,
                "shape_pick": 0.7,
            }
        },
    }
    write_card(weights, runs, {"maps": maps, "samples": None}, {"seed": 1}, "a test machine")
    meta = json.loads((weights / "config.json").read_text())
    meta["stages"] = [{k: v for k, v in st.items() if k != "log"} for st in runs]  # as release_shapes.py stores them
    (weights / "config.json").write_text(json.dumps(meta))
    again = recorded_stages(weights)
    assert [st["loss_points"] for st in again] == [
        [[10, 0.1], [20, 0.05], [30, 0.033333], [40, 0.025]],
        [[10, 0.1], [20, 0.05]],
    ]
    assert again[1]["log"][1] == {"step": 20, "loss": 0.05} and again[0]["command"] == "train-shapes --out run0"
    write_card(weights, again, {"maps": maps, "samples": None}, {"seed": 1}, "a test machine")  # redraws from them


def test_a_rewrite_keeps_the_hand_written_history_section(tmp_path):
    from conceptattention_lab.card import HAND_WRITTEN, hand_written_tail

    card = tmp_path / "MODEL_CARD.md"
    assert hand_written_tail(card) == ""  # no card yet
    card.write_text("# generated\n\nold numbers\n\n" + HAND_WRITTEN + "\n\nstage 1 took 89 minutes.\n\n")
    assert hand_written_tail(card) == "\n" + HAND_WRITTEN + "\n\nstage 1 took 89 minutes.\n"
    card.write_text("# generated, no history\n")
    assert hand_written_tail(card) == ""


def test_the_shipped_card_holds_its_hand_written_history_once():
    from conceptattention.pipelines.shapes import WEIGHTS_DIR
    from conceptattention_lab.card import HAND_WRITTEN

    assert (WEIGHTS_DIR / "MODEL_CARD.md").read_text().count(HAND_WRITTEN) == 1
