"""Two CPU ranks (gloo DDP) under `accelerate launch` run the tiny LoRA recipe and agree on loss and weights.

accelerate 1.15's `--cpu` flag always uses its single-process launcher (several CPU processes need MPI), so the
test launches through torchrun (`--multi_gpu --num_processes 2`) and the recipe sets `use_cpu=True`, which makes
each rank join a gloo process group on the CPU.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]

DRIVER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from finetune.config import load_recipe
    from finetune.sft import build_trainer

    export_dir, out_dir = sys.argv[1], Path(sys.argv[2])
    recipe = load_recipe(
        {recipe!r},
        [f"model={{export_dir}}", "sft.use_cpu=true", "sft.max_steps=2", "sft.logging_steps=1", "sft.per_device_train_batch_size=1",
         'sft.save_strategy="no"', "merge_adapter=false", "sft.disable_tqdm=true"],
    )
    trainer = build_trainer(recipe, output_dir=str(out_dir))
    trainer.train()
    state = trainer.accelerator.state
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    report = dict(
        rank=state.process_index,
        world_size=state.num_processes,
        backend=str(state.backend),
        losses=[entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        checksum=sum(float(p.detach().double().sum()) for p in trainable),
        abs_checksum=sum(float(p.detach().double().abs().sum()) for p in trainable),
    )
    (out_dir / f"rank{{state.process_index}}.json").write_text(json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_export")
    subprocess.run([sys.executable, "-m", "minicpmo.export", "--tiny", str(folder)], check=True, cwd=REPO_ROOT,
                   capture_output=True)
    return folder


def test_two_cpu_ranks_finish_with_the_same_loss(tiny_export, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(repo=str(REPO_ROOT), recipe=str(REPO_ROOT / "finetune/examples/tiny_lora_llm.yaml")))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), CUDA_VISIBLE_DEVICES="")
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(driver), str(tiny_export), str(out_dir),
    ]
    run = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    reports = [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(r["world_size"] == 2 for r in reports)
    assert all(r["backend"] == "gloo" for r in reports), reports
    assert len(reports[0]["losses"]) == 2
    # The logged loss is gathered over both ranks, and DDP keeps the replicas identical after each step.
    assert reports[0]["losses"] == pytest.approx(reports[1]["losses"], rel=1e-6)
    assert reports[0]["checksum"] == pytest.approx(reports[1]["checksum"], rel=1e-6, abs=1e-9)
    assert reports[0]["abs_checksum"] == pytest.approx(reports[1]["abs_checksum"], rel=1e-6)
    assert reports[0]["abs_checksum"] > 0
