"""`loraplex train` with its defaults: the schedule scales with the data, an adapter no better than the base
is refused (exit 3, nothing written or registered) unless --force, and a run prints no library noise."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_train import sentences, write_jsonl
from transformers import AutoModelForSequenceClassification

from loraplex.cli import main as cli_main
from loraplex_adapters.store import AdapterStore
from loraplex_adapters.train_cli import NOT_BETTER
from loraplex_adapters.training_schedule import MAX_EPOCHS, auto_schedule

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize(("rows", "batch", "epochs", "eval_every"), [
    (45, 8, MAX_EPOCHS, 6),  # 50 rows, 5 held out: the most epochs, evaluated after each
    (72, 8, MAX_EPOCHS, 9),  # the newcomer's 80 rows, 8 held out
    (640, 16, 3, 25),  # the topic recipe's size
    (900, 16, 2, 25),  # ~1,000 rows, 10 % held out
    (4500, 16, 1, 29),  # 5,000 rows: one epoch, evaluated about 10 times
])
def test_the_schedule_scales_with_the_data(rows, batch, epochs, eval_every):
    schedule = auto_schedule(rows)
    assert (schedule.batch_size, schedule.epochs, schedule.eval_every) == (batch, epochs, eval_every)
    assert schedule.learning_rate == 1e-3 and schedule.patience == 3
    assert auto_schedule(rows, full=True).learning_rate == 5e-5
    given = auto_schedule(rows, learning_rate=2e-4, batch_size=4, epochs=2, eval_every=7, patience=0)
    assert (given.learning_rate, given.batch_size, given.epochs, given.eval_every, given.patience) == (2e-4, 4, 2, 7,
                                                                                                      0)


def _train(tmp_path: Path, base: Path, capsys, *extra: str) -> tuple[int, dict, str]:
    data = write_jsonl(tmp_path / "train.jsonl", sentences(0, 48))
    code = cli_main(["train", "classification", "--data", data, "--output", str(tmp_path / "out"), "--base",
                     str(base), "--rank", "4", "--alpha", "8", "--dtype", "float32", "--eval-fraction", "0.25",
                     "--no-progress", *extra])
    out, err = capsys.readouterr()
    return code, json.loads(out.strip().splitlines()[-1]), err


def test_an_adapter_no_better_than_the_base_is_not_written_unless_forced(tiny, tmp_path, capsys):
    base, _ = tiny("llama")
    store = tmp_path / "store"
    AdapterStore(store)
    # A learning rate that moves nothing: the adapter scores exactly what the untrained head scores.
    still = ["--learning-rate", "1e-12", "--epochs", "2", "--store", str(store)]
    (tmp_path / "out" / "adapter").mkdir(parents=True)  # an older run's adapter must not survive as this one's
    code, summary, err = _train(tmp_path, base, capsys, *still)
    assert code == NOT_BETTER
    assert summary["adapter"] is None and summary["registered"] is None and summary["beats_base"] is False
    assert summary["after"]["accuracy"] <= summary["base"]["accuracy"]
    assert "NOT WRITTEN" in err and "NOT better than the base" in err and "--force" in err
    assert not (tmp_path / "out" / "adapter").exists()
    assert AdapterStore(store).list() == []

    code, summary, err = _train(tmp_path, base, capsys, *still, "--force")
    assert code == 0 and summary["beats_base"] is False and summary["registered"] == "out@1"
    assert "written anyway (--force)" in err
    manifest = json.loads((tmp_path / "out" / "adapter" / "loraplex.json").read_text())
    assert manifest["metrics"]["beats_base"] is False and manifest["metrics"]["base"] == summary["base"]


def test_defaults_learn_and_say_so_in_one_line(tiny, tmp_path, capsys):
    base, _ = tiny("llama")
    code, summary, err = _train(tmp_path, base, capsys)
    assert code == 0 and summary["beats_base"] is True
    assert summary["schedule"] == {"learning_rate": 1e-3, "batch_size": 8, "epochs": MAX_EPOCHS, "eval_every": 5,
                                   "patience": 3}
    assert summary["after"]["accuracy"] > summary["base"]["accuracy"]
    last = err.strip().splitlines()[-1]
    assert last.startswith("held-out accuracy") and "better than the base" in last and "adapter: " in last


def test_compare_full_fine_tunes_every_weight_on_the_same_split(tiny, tmp_path, capsys):
    base, _ = tiny("llama")
    code, summary, err = _train(tmp_path, base, capsys, "--compare-full")
    assert code == 0
    comparison = summary["compare_full"]
    assert comparison["lora"] == summary["after"] and comparison["full"]["examples"] == summary["after"]["examples"]
    assert comparison["ratio"] == pytest.approx(summary["after"]["accuracy"] / comparison["full"]["accuracy"])
    assert comparison["full_learning_rate"] == 5e-5 and comparison["full_steps"] <= MAX_EPOCHS * 5
    # every weight of the tiny base and its 2-label score head
    assert comparison["full_trainable_parameters"] == sum(
        p.numel() for p in AutoModelForSequenceClassification.from_pretrained(base, num_labels=2).parameters())
    assert "LoRA / full accuracy" in err
    manifest = json.loads((tmp_path / "out" / "adapter" / "loraplex.json").read_text())
    assert manifest["metrics"]["compare_full"] == comparison


def test_compare_full_needs_an_unquantized_base(tiny, tmp_path, capsys):
    base, _ = tiny("llama")
    code = cli_main(["train", "classification", "--data", write_jsonl(tmp_path / "d.jsonl", sentences(0, 16)),
                     "--output", str(tmp_path / "out"), "--base", str(base), "--compare-full", "--quantize", "nf4"])
    assert code == 2 and "--quantize none" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before any model was loaded


# Makes bitsandbytes believe the CPU has AVX512-BF16, as the newcomer's did: its import then takes the
# branch that logs the missing-kernel line (the `kernels` package is not installed).
CLAIM_AVX512_BF16 = textwrap.dedent("""
    import importlib.abc, importlib.machinery, sys

    class ClaimAvx512Bf16(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "bitsandbytes.functional":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                module.has_avx512bf16 = lambda: True
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, ClaimAvx512Bf16())
""")
CONTROL = CLAIM_AVX512_BF16 + textwrap.dedent("""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], num_labels=2)
    get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["q_proj"]))
""")
TRAIN = CLAIM_AVX512_BF16 + textwrap.dedent("""
    from loraplex.cli import main
    sys.exit(main(sys.argv[1:]))
""")
NOISE = ("Failed to load CPU gemm_4bit_forward from kernels-community", "FutureWarning")
# Only where torchao is installed (peft imports it): its extensions that do not fit, and torch's note on them.
TORCHAO_NOISE = ("torchao/_C", "is an Enum subclass and is now natively supported")


def test_a_training_run_prints_no_library_noise(tiny, tmp_path):
    base, _ = tiny("llama")
    # The control shows both lines do come out of these libraries here, so their absence below means something.
    control = subprocess.run([sys.executable, "-c", CONTROL, str(base)], capture_output=True, text=True, cwd=ROOT,
                             timeout=300)
    assert control.returncode == 0, control.stderr
    assert all(line in control.stderr for line in NOISE), control.stderr

    data = write_jsonl(tmp_path / "train.jsonl", sentences(0, 24))
    run = subprocess.run([sys.executable, "-c", TRAIN, "train", "classification", "--data", data, "--output",
                          str(tmp_path / "out"), "--base", str(base), "--epochs", "1", "--dtype", "float32",
                          "--eval-fraction", "0.25", "--force"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    noise = NOISE + TORCHAO_NOISE
    assert not [line for line in run.stderr.splitlines() if any(n in line for n in noise)], run.stderr
    assert "train: 100%" in run.stderr  # the progress bar is still there


@pytest.mark.long  # over a minute of 2 cores: `make test-long` runs it (`make test` stays under 10 minutes)
@pytest.mark.timeout(1800)  # about 90 s of CPU; a shared machine stretched it past the default 600 s
def test_defaults_learn_the_readme_example_on_the_embedded_base(tmp_path, capsys):
    """The README's example: 80 rows of adapters/recipes/data/urgent_messages.csv, 8 held out, defaults only."""
    data = ROOT / "adapters" / "recipes" / "data" / "urgent_messages.csv"
    code = cli_main(["train", "classification", "--data", str(data), "--output", str(tmp_path / "urgent"),
                     "--no-progress"])
    out, err = capsys.readouterr()
    summary = json.loads(out.strip().splitlines()[-1])
    assert code == 0, err
    assert summary["beats_base"] is True and summary["after"]["accuracy"] > summary["base"]["accuracy"]
    assert (tmp_path / "urgent" / "adapter" / "adapter_model.safetensors").is_file()
