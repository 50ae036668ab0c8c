import dataclasses

import pytest

from common.core import lr
from common.core.config import RunConfig, build_parser, parse_config
from common.core.errors import UsageError
from common.parallel.plan import ParallelPlan, check_batch


def test_every_field_is_a_flag_with_its_default():
    config = parse_config([])
    assert config == RunConfig()
    flags = {action.dest for action in build_parser()._actions}
    assert {field.name for field in dataclasses.fields(RunConfig)} <= flags


def test_flags_parse_into_the_config():
    config = parse_config(["--model", "resnet", "--batch-size", "32", "--lr", "0.1", "--no-progress",
                           "--fp16-allreduce", "--accumulation-steps", "2"])
    assert (config.model, config.batch_size, config.lr, config.progress) == ("resnet8", 32, 0.1, False)  # alias
    assert config.fp16_allreduce and config.accumulation_steps == 2


@pytest.mark.parametrize("argv,message", [
    (["--model", "vgg"], "invalid choice: 'vgg'"),
    (["--dataset", "mnist"], "invalid choice: 'mnist'"),
    (["--epochs", "-1"], "--epochs must not be negative"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--lr", "0"], "--lr must be positive"),
    (["--lr", "nan"], "--lr must be positive"),
    (["--momentum", "1.5"], "--momentum must be in"),
    (["--accumulation-steps", "0"], "--accumulation-steps must be at least 1"),
    (["--resume"], "--resume needs the run to continue: --run-dir DIR"),
    (["--resume", "--run-dir", "none"], "--resume needs the run to continue"),
    (["--elastic"], "--elastic needs --run-dir DIR"),
    (["--dataset", "cifar10"], "needs --data-dir"),
    (["--dataset", "synthetic", "--synthetic-shape", "3x32"], "--synthetic-shape '3x32'"),
    (["--batch-szie", "3"], "unrecognized arguments"),
    (["--epochs", "two"], "invalid int value"),
    (["--adasum", "--fp16-allreduce"], "cannot be combined"),
    (["--elastic", "--mode", "model", "--pp", "2"], "--elastic is for --mode data"),
    (["--elastic", "--batch-size-per-rank", "32"], "keeps the global batch fixed"),
    (["--mode", "ps", "--microbatches", "4"], "--microbatches does not apply to --mode ps"),
    (["--elastic-commit-steps", "0"], "--elastic-commit-steps must be at least 1"),
    (["--metrics-file", "/nonexistent/dir/m.jsonl"], "does not exist"),
    (["--summary-file", "/nonexistent/dir/s.json"], "--summary-file: directory /nonexistent/dir does not exist"),
    (["--mode", "model", "--pp", "2", "--schedule", "interleaved", "--microbatches", "3"],
     "rounds of --pp 2; use --microbatches a multiple of 2 .got 3., e.g. 4"),
    (["--mode", "model", "--pp", "2", "--schedule", "interleaved", "--microbatches", "4", "--virtual-stages", "1"],
     "--virtual-stages >= 2 .got 1.; with one piece per rank use --schedule 1f1b"),
    (["--mode", "model", "--pp", "1", "--schedule", "interleaved"], "use --pp >= 2"),
    (["--mode", "model", "--pp", "2", "--schedule", "zb", "--recompute"], "--recompute does not combine with"),
    (["--mode", "auto", "--pp", "2"], "--mode auto chooses the layout itself; drop --pp"),
    (["--mode", "auto", "--split", "3"], "drop --split"),
    (["--memory-per-rank", "2G"], "--memory-per-rank is for --mode auto"),
    (["--plan-only"], "--plan-only is for --mode auto"),
    (["--mode", "auto", "--plan-ranks", "4"], "add --plan-only"),
    (["--mode", "auto", "--memory-per-rank", "lots"], "--memory-per-rank 'lots' is not a size"),
    (["--mode", "auto", "--memory-per-rank=-1G"], "is not a size"),
])
def test_bad_flags_raise_a_usage_error(argv, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_config(argv)


def test_world_size_checks():
    check_batch(RunConfig(batch_size=2), ParallelPlan("data", 1, 2))
    with pytest.raises(UsageError, match="smaller than the 4 ranks"):
        check_batch(RunConfig(batch_size=3), ParallelPlan("data", 1, 4))
    assert RunConfig(batch_size_per_rank=8).global_batch_size(4) == 32


def test_lr_rules():
    strong = RunConfig(lr=0.1)
    assert lr.lr_at(0, 10, strong, 4) == 0.1  # global batch: LR independent of world size
    weak = RunConfig(lr=0.1, batch_size_per_rank=16)
    assert lr.peak_lr(weak, 4) == pytest.approx(0.4)
    ramp = [lr.lr_at(step, 10, weak, 4) for step in range(12)]
    assert ramp[0] == pytest.approx(0.1 + 0.3 / 10) and ramp[9] == pytest.approx(0.4)
    assert all(a < b for a, b in zip(ramp[:9], ramp[1:10])) and ramp[11] == pytest.approx(0.4)
    assert lr.lr_at(0, 10, weak, 1) == pytest.approx(0.1)  # one rank: nothing to warm up


def test_cosine_schedule_decays_from_the_peak_after_warmup_to_zero_at_the_end():
    config = RunConfig(lr=0.2, lr_schedule="cosine", epochs=4, warmup_epochs=1)
    rates = [lr.lr_at(step, 10, config, 2) for step in range(40)]
    assert rates[9] == pytest.approx(0.2) and rates[10] == pytest.approx(0.2)  # warmup's end, the peak
    assert rates[25] == pytest.approx(0.1)  # half way through the decay
    assert all(a > b for a, b in zip(rates[10:39], rates[11:40])) and rates[39] < 0.001


def test_elastic_is_accepted_by_both_entry_scripts():
    from common.core import trainer

    for prog in ("train_tf/main.py", "train_torch/main.py"):
        assert trainer.load_run(["--elastic", "--run-dir", "none"], prog).config.elastic


@pytest.mark.parametrize("argv,message", [
    (["--amp", "fp16", "--mode", "model", "--pp", "2"], "--amp fp16 scales the loss of one whole model"),
    (["--sync-bn", "--mode", "ps"], "--sync-bn synchronises BatchNorm across data-parallel replicas"),
    (["--sync-bn", "--mode", "model", "--pp", "2"], "--mode model has none"),
    (["--amp", "fp16", "--adasum"], "cannot be combined"),
    (["--loss-scale", "0"], "--loss-scale must be positive"),
    (["--amp", "fp8"], "invalid choice"),
])
def test_precision_and_batch_norm_flags_refuse_what_cannot_work(argv, message):
    with pytest.raises(UsageError, match=message):
        parse_config(argv)


def test_amp_alone_means_bf16_and_resnet_is_resnet8():
    config = parse_config(["--amp", "--model", "resnet"])
    assert (config.amp, config.model) == ("bf16", "resnet8")
    assert parse_config([]).amp == "off"


def test_every_flag_is_in_exactly_one_group_and_help_shows_the_groups():
    from common.core.config import GROUPS

    grouped = [name for names in GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(field.name for field in dataclasses.fields(RunConfig))
    assert len(grouped) == len(set(grouped))
    shown = build_parser("main.py").format_help()
    assert all(f"\n{group}:\n" in shown for group in GROUPS), shown


def test_mode_dataset_schedule_amp_and_balance_are_enums():
    from common.core.config import Amp, Balance, DatasetName, Mode, Schedule

    config = parse_config(["--mode", "model", "--pp", "2", "--schedule", "gpipe", "--amp", "--balance", "time",
                           "--dataset", "synthetic"])
    assert (config.mode, config.schedule, config.amp, config.balance, config.dataset) == \
        (Mode.MODEL, Schedule.GPIPE, Amp.BF16, Balance.TIME, DatasetName.SYNTHETIC)
    assert RunConfig(mode="hybrid").mode is Mode.HYBRID and f"{Mode.PS}" == "ps"


def test_a_config_file_sets_flags_and_the_command_line_overrides_it(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[parallel]\nmode = "model"\npp = 2\nmicrobatches = 4\n\n[training]\nepochs = 3\n'
                    'batch_size = 32\n\n[optimiser]\nlr = 1\n\nseed = 7\n')
    config = parse_config(["--config", str(path), "--epochs", "5"])
    assert (config.mode, config.pp, config.microbatches, config.batch_size, config.seed) == ("model", 2, 4, 32, 7)
    assert config.epochs == 5 and config.lr == 1.0 and isinstance(config.lr, float)


def test_a_run_directorys_config_toml_repeats_its_settings(tmp_path):
    from common.core.config import as_toml

    config = parse_config(["--mode", "hybrid", "--pp", "2", "--dp", "2", "--microbatches", "2", "--schedule",
                           "gpipe", "--model", "resnet", "--amp", "--no-augment", "--lr", "0.2",
                           "--timeline", "--data-dir", 'a "quoted" dir'])
    path = tmp_path / "config.toml"
    path.write_text(as_toml(config))
    assert parse_config(["--config", str(path)]) == config


@pytest.mark.parametrize("text,message", [
    ("pipeline_stages = 2\n", "'pipeline_stages' is not a flag"),
    ("[parallel]\npp = \"two\"\n", "pp must be int"),
    ("[model]\nsync_bn = 1\n", "sync_bn must be bool"),
    ("[parallel\npp = 2\n", "not valid TOML"),
    ("mode = \"pipeline\"\n", "mode must be one of data, model, hybrid, ps"),
])
def test_a_bad_config_file_is_one_clear_line(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message):
        parse_config(["--config", str(path)])
    with pytest.raises(UsageError, match="cannot read it"):
        parse_config(["--config", str(tmp_path / "missing.toml")])
    huge = tmp_path / "huge.toml"
    huge.write_text("# " + "x" * (2 << 20) + "\n")
    with pytest.raises(UsageError, match="is not a settings file"):
        parse_config(["--config", str(huge)])


def test_memory_sizes_read_in_binary_units():
    from common.launch.memory_budget import parse_size

    assert parse_size("512M") == 512 << 20
    assert parse_size("2g") == parse_size("2GiB") == parse_size("2GB") == 2 << 30
    assert parse_size("1.5G") == 3 << 29
    assert parse_size("4096") == 4096


def test_the_default_memory_per_rank_shares_the_card_among_the_ranks_dealt_to_it():
    from common.launch.memory_budget import memory_per_rank, node_memory_bytes

    card = 80 << 30
    assert memory_per_rank(4, device_bytes=card, devices=4) == card  # one rank a card
    assert memory_per_rank(8, device_bytes=card, devices=4) == card // 2
    assert memory_per_rank(5, device_bytes=card, devices=4) == card // 2  # the card dealt two ranks decides
    assert memory_per_rank(4, device_bytes=None) == node_memory_bytes() // 4  # on a CPU: the host's share
