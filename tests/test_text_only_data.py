"""Text-only records through the real data layer (issue 18): `data check` counts them and warns when the recipe
trains nothing they reach, and a mixed dataset trains to the end with a step that holds only the text record."""

import json
import re

from minigpt4qwen.checkpoint.native import read_native_checkpoint
from minigpt4qwen.cli.main import main
from minigpt4qwen.data.sampler import epoch_plan
from tests.test_cli_train import project  # noqa: F401 (a fixture)

TEXT_ONLY_RECORD = 4  # the project's fifth record: "Say hi." without an image


def test_data_check_counts_text_only_records_and_warns_for_image_only_recipes(project, capsys):  # noqa: F811
    config = str(project / "train.yaml")
    assert main(["data", "check", config]) == 0  # a warning, not a problem
    out = capsys.readouterr().out
    assert "text-only" in out and re.search(r"\s5\s+5\s+4\s+1\n", out)  # records, usable, images, text-only
    assert "WARNING: 1 of 5 usable records are text-only, but this run trains only language_projection" in out
    for recipe in (["model.trainable.language_model=true"], ["train.lora.enabled=true"]):
        assert main(["data", "check", config, *recipe]) == 0
        assert "WARNING" not in capsys.readouterr().out, recipe


def test_a_mixed_dataset_trains_to_the_end(project, tmp_path):  # noqa: F811
    # A seed whose order does not put the text record first, so the step before it has a checkpoint to compare.
    seed = next(s for s in range(10) if epoch_plan(5, 1, s, 0)[0] != [TEXT_ONLY_RECORD])
    text_step = [batch[0] for batch in epoch_plan(5, 1, seed, 0)].index(TEXT_ONLY_RECORD) + 1
    run = tmp_path / "run"
    assert main(["train", str(project / "train.yaml"), f"train.output_dir={run}", f"train.seed={seed}",
                 "train.micro_batch_size=1", "train.max_steps=5", "train.warmup_steps=0", "train.save_every_steps=1",
                 "train.keep_last=0", "train.log_every=1"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5]
    weights = [read_native_checkpoint(run / f"checkpoint-{step:08d}")["language_projection.weight"]
               for step in range(1, 6)]
    for step in range(2, 6):  # only the text-only step leaves the projection as it was
        assert weights[step - 2].equal(weights[step - 1]) == (step == text_step), step
