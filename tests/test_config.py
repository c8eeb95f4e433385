import pytest
import yaml

from tests.helpers import REPO, make_config
from titan_rl.config import config_from_dict, config_to_dict, load_config
from titan_rl.errors import ConfigError
from titan_rl.registry import build_algorithm, build_policy


def test_default_config_has_the_seed_keys():
    cfg = make_config()
    assert cfg.rollout_server.env_name == "CartPole-v1"
    assert cfg.rollout_server.num_workers >= 1
    assert cfg.policy.path == "models.simple_policy.SimplePolicy"
    assert cfg.policy.kwargs["state_dim"] == 4 and cfg.policy.kwargs["action_dim"] == 2
    assert cfg.algorithm.path == "trainers.dqn.DQN" and type(cfg.algorithm.config).__name__ == "DQNConfig"
    assert 0 < cfg.algorithm.config.lr and 0 <= cfg.algorithm.config.gamma <= 1 and cfg.train.batch_size <= cfg.train.min_buffer_size


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("algorithm.config.gamma=1.3", "cartpole.yaml: algorithm.config.gamma=1.3 must be in [0, 1]"),
        ("algorithm.config.gama=0.9", "cartpole.yaml: unknown key algorithm.config.gama (did you mean algorithm.config.gamma?)"),
        ("algorithm.config.replay=sorted", "algorithm.config.replay='sorted' must be one of uniform, prioritized"),
        ("algorithm.path=trainers.dqn.Nope", "module 'trainers.dqn' has no 'Nope'"),
        ("algorithm.path=models.simple_policy.SimplePolicy", "is not a subclass of titan_rl.algorithm.Algorithm"),
        ("trian.batch_size=1", "unknown key trian"),
        ("train.batch_size=sixty", "train.batch_size='sixty' must be of type int"),
        ("train.batch_size=true", "must be of type int"),
        ("algorithm.config.epsilon_final=[0.1, 0.2, 0.3]", "algorithm.config.epsilon_final has 3 values but rollout_server.num_workers=2"),
        ("algorithm.config.epsilon_final=1.5", "algorithm.config.epsilon_final=1.5 must be in [0, 1]"),
        ("train.lr=0.1", "train.lr (moved: algorithm.config.lr)"),
        ("rollout_server.epsilon=0.1", "rollout_server.epsilon (moved: algorithm.config.epsilon_final"),
        ("trainer.path=trainers.dqn.DQNTrainer", "unknown key trainer (replaced by algorithm.path"),
        ("buffer_server.capacity_transitions=10", "renamed: buffer_server.capacity_items"),
        ("logging.wandb_mode=maybe", "logging.wandb_mode='maybe' must be one of offline, online, disabled"),
        ("logging.wandb_project=team/rl:cartpole", "logging.wandb_project='team/rl:cartpole' must not contain / :"),
        ("policy.path=SimplePolicy", "policy.path='SimplePolicy' must be a dotted path"),
        ("train.min_buffer_size=10", "train.batch_size=64 exceeds train.min_buffer_size=10"),
        ("train=3", "cartpole.yaml: train must be a mapping of keys, got 3"),
        ("train.device=gpu", "train.device='gpu' must be one of cpu, cuda, auto"),
        ("train.learner_group_address=trainer", "train.learner_group_address='trainer' must be host:port"),
        ("train.learner_group_address=trainer:29500", "is set but train.learners=1: there is no group to meet"),
        ("train.learner_group_address=trainer:99999", "train.learner_group_address='trainer:99999' must be host:port"),
        ("logging.run_name=../outside", "logging.run_name='../outside' must be one folder name"),
        ("logging.run_name=/tmp/elsewhere", "logging.run_name='/tmp/elsewhere' must be one folder name"),
        ("logging.run_name=runs/a", "logging.run_name='runs/a' must be one folder name"),
        ("logging.run_name=..", "logging.run_name='..' must be one folder name"),
        ("logging.run_name=.hidden", "logging.run_name='.hidden' must be one folder name"),
        ("seed=-1", "cartpole.yaml: seed=-1 must be in [0, 4294967295]"),
        ("durability.snapshot_interval_s=.inf", "durability.snapshot_interval_s=inf must be a finite number"),
        ("algorithm.config.max_grad_norm=.nan", "algorithm.config.max_grad_norm=nan must be a finite number"),
        ("rollout_server.replica_id=3000000000", "replica_id=3000000000 with num_workers=2 gives worker ids past 2147483647"),
        ("security.token=héhé", "security.token must be 1 to 4096 printable ASCII characters, not starting or ending with a space"),
        ("security.token='a b '", "security.token must be 1 to 4096 printable ASCII characters"),
    ],
)
def test_bad_values_name_the_file_the_key_and_the_reason(override, message):
    with pytest.raises(ConfigError) as e:
        make_config(override)
    assert message in str(e.value)


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("seed: 1\nbudget:\n  max_env_step: 10\n")
    with pytest.raises(ConfigError, match=r"mine.yaml: unknown key budget.max_env_step \(did you mean budget.max_env_steps\?\)"):
        load_config(path)


def test_missing_file_and_bad_yaml_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_a_key_written_twice_in_one_section_is_a_config_error_naming_it(tmp_path):
    """YAML keeps the last of two equal keys without a word: an edit of the first did nothing."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  batch_size: 32\n  min_buffer_size: 100\n  batch_size: 64\n")
    with pytest.raises(ConfigError) as e:
        load_config(twice)
    assert f"twice.yaml: not valid YAML: the key 'batch_size' is written here\n  in \"{twice}\", line 2" in str(e.value)
    assert f"and again as 'batch_size' here\n  in \"{twice}\", line 4" in str(e.value)
    yes_and_on = tmp_path / "yes_and_on.yaml"  # one key to YAML 1.1: True
    yes_and_on.write_text("algorithm:\n  config:\n    on: 1\n    yes: 2\n")
    with pytest.raises(ConfigError, match="the key 'on' is written here(.|\n)*and again as 'yes' here"):
        load_config(yes_and_on)


def test_merge_keys_override_and_nest_as_yaml_means_them_to(tmp_path):
    """A mapping's own key over a merged one is no repeat, also in a merged mapping that itself merges
    (flattening rewrites it in place, before it is checked on its own)."""
    from titan_rl.config import _read_yaml

    merged = tmp_path / "merged.yaml"
    merged.write_text("train:\n  <<: {batch_size: 16, min_buffer_size: 100}\n  batch_size: 32\n")
    assert (load_config(merged).train.batch_size, load_config(merged).train.min_buffer_size) == (32, 100)
    nested = "a:\n  inner: &mid\n    <<: {lr: 1, gamma: 0.5}\n    lr: 2\nb: {<<: *mid, gamma: 0.9}\n"
    plain = yaml.load(nested, Loader=yaml.SafeLoader)
    assert plain == {"a": {"inner": {"lr": 2, "gamma": 0.5}}, "b": {"lr": 2, "gamma": 0.9}}
    assert _read_yaml(nested, "nested.yaml") == plain


def test_a_config_that_is_a_folder_or_not_text_is_a_config_error(tmp_path):
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(ConfigError, match="folder.yaml: a folder, not a config file"):
        load_config(tmp_path / "folder.yaml")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00junk")
    with pytest.raises(ConfigError, match="binary.yaml: not a UTF-8 text file"):
        load_config(tmp_path / "binary.yaml")


def test_overrides_parse_yaml_values_and_partial_sections_keep_defaults():
    cfg = make_config("algorithm.config.lr=0.0005", "seed=3", "algorithm.config.epsilon_final=[0.1, 0.5]", "budget.target_eval_return=null")
    assert cfg.algorithm.config.lr == 0.0005 and cfg.seed == 3 and cfg.budget.target_eval_return is None
    assert cfg.algorithm.config.epsilon_final == [0.1, 0.5]
    assert cfg.algorithm.config.gamma == make_config().algorithm.config.gamma


def test_ints_are_accepted_for_floats_and_stored_as_floats():
    cfg = make_config("algorithm.config.lr=1", "budget.max_wall_s=60")
    assert isinstance(cfg.algorithm.config.lr, float) and isinstance(cfg.budget.max_wall_s, float)


def test_config_survives_the_round_trip_through_a_plain_dict():
    cfg = make_config("algorithm.config.epsilon_final=[0.1, 0.5]")
    assert config_from_dict(config_to_dict(cfg)) == cfg


@pytest.mark.parametrize("path", sorted(p.name for p in (REPO / "config").glob("*.yaml")))
def test_every_shipped_config_loads(path):
    cfg = load_config(REPO / "config" / path)
    assert cfg.algorithm.path.startswith("trainers.")


def test_a_config_read_from_data_may_only_name_classes_under_models_and_trainers():
    raw = config_to_dict(make_config())
    for key, path in [("policy", "os.system"), ("algorithm", "subprocess.Popen"), ("policy", "models.x; import os")]:
        with pytest.raises(ConfigError, match="is not allowed here|is not a dotted path of Python names"):
            config_from_dict({**raw, key: {**raw[key], "path": path}}, "checkpoint config", allowed_modules=("models", "trainers"))


def test_the_kubernetes_config_map_holds_a_valid_config():
    import yaml

    from tests.helpers import REPO

    (config_map,) = yaml.safe_load_all((REPO / "deploy" / "k8s" / "config.yaml").read_text())
    cfg = config_from_dict(yaml.safe_load(config_map["data"]["cluster.yaml"]), "deploy/k8s/config.yaml")
    assert cfg.buffer_server.dial_address == "titan-buffer:50052" and cfg.trainer_server.host == "0.0.0.0"
    # what the pods build from it at start: the env's spaces, the policy, the algorithm (it once lacked policy.kwargs)
    algorithm = build_algorithm(cfg)
    algorithm.check_network(build_policy(cfg))
    local = load_config(REPO / "config" / "cartpole.yaml")
    assert (cfg.policy, cfg.algorithm, cfg.train) == (local.policy, local.algorithm, local.train), "the cluster trains as run.sh does"


def test_sample_messages_hold_whole_batches_of_about_rows_per_request():
    train = make_config("train.rows_per_request=2048").train
    assert train.batches_per_request() == 2048 // train.batch_size
    assert train.batches_per_request(256) == 8 and train.batches_per_request(300) == 6
    assert train.batches_per_request(4096) == 1  # never less than one batch


def test_a_key_whose_unit_changed_says_so_instead_of_suggesting_a_rename():
    with pytest.raises(ConfigError, match=r"train\.batches_per_request \(renamed: train\.rows_per_request counts rows"):
        make_config("train.batches_per_request=32")


def _readme_table(heading: str) -> list[tuple[list[str], list[str]]]:
    """(keys, defaults) of each row of the README table that follows `heading`; a row such as
    `section.a` / `b` | 1 / 2 names keys of one section."""
    text = (REPO / "README.md").read_text()
    rows = []
    for line in text[text.index(heading) :].splitlines()[1:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if not cells[0].startswith("`"):
            continue
        keys = [key.strip().strip("`") for key in cells[0].split(" / ")]
        section = keys[0].rpartition(".")[0]
        full = [keys[0], *(f"{section}.{key}" if section and "." not in key else key for key in keys[1:])]
        rows.append((full, [value.strip().strip("`") for value in cells[1].split(" / ")] if cells[1] else []))
    return rows


def _code_default(objects: list[object], dotted: str) -> object:
    for obj in objects:
        try:
            for part in dotted.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise AssertionError(f"README.md documents {dotted!r}, which no config dataclass has")


@pytest.mark.parametrize(
    ("heading", "algorithms"),
    [("| key | default | meaning |", None), ("**Off-policy algorithms**", ["trainers.dqn.DQN", "trainers.qr_dqn.QRDQN"]),
     ("**On-policy algorithms**", ["trainers.impala.IMPALA"])],
)  # fmt: skip
def test_the_readmes_yaml_reference_shows_the_defaults_of_the_code(tmp_path, heading, algorithms):
    """One source of defaults, the dataclasses: the README's default column must say what a config
    that leaves a key out gets."""
    from titan_rl.registry import algorithm_class

    minimal = tmp_path / "minimal.yaml"
    minimal.write_text("seed: 0\n")
    objects = [load_config(minimal)] if algorithms is None else [algorithm_class(path).Config() for path in algorithms]
    checked = 0
    for keys, defaults in _readme_table(heading):
        if not defaults or keys == ["algorithm.config"]:  # "as above", "the class's defaults"
            continue
        assert len(defaults) == len(keys), f"README.md row {keys}: {len(defaults)} defaults for {len(keys)} keys"
        for key, shown in zip(keys, defaults, strict=True):
            code = _code_default(objects, key)
            assert yaml.safe_load(shown) == code, f"README.md shows {key}: {shown}, the code's default is {code!r}"
            checked += 1
    assert checked >= 5


@pytest.mark.parametrize("path", sorted((REPO / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_the_default_run_name_of_every_shipped_config_is_one_folder_name(path):
    """MinAtar's env id `titan_rl.minatar_envs:MinAtar/Breakout-v1` made runs/titan_rl.minatar_envs:MinAtar/ a folder of its own."""
    from titan_rl.config import RUN_NAME, default_run_name

    name = default_run_name(load_config(path))
    assert RUN_NAME.fullmatch(name) and "/" not in name and ":" not in name, name
    assert load_config(path, [f"logging.run_name={name}"]).logging.run_name == name


def test_resume_refuses_a_checkpoint_whose_run_name_leads_out_of_the_run_folder(tmp_path):
    import torch

    from titan_rl.checkpoint import FORMAT, run_to_resume
    from titan_rl.errors import TitanError

    raw = config_to_dict(make_config())
    raw["logging"]["run_name"] = str(tmp_path / "outside")
    torch.save({"format": FORMAT, "config": raw, "policy": {}, "learner": {}, "counters": {}, "eval_returns": []}, tmp_path / "c_last.pth")
    with pytest.raises(TitanError, match=f"{tmp_path / 'c_last.pth'} names the run '{tmp_path / 'outside'}', which is not one folder name"):
        run_to_resume(tmp_path / "c.pth")


def test_a_last_checkpoint_that_cannot_be_read_now_stops_the_resume_instead_of_starting_over(tmp_path):
    """With no file handle left, torch's reader failed with EMFILE, which was taken for a damaged file:
    the trainer logged a warning and started the run over from a fresh learner (and a worse first
    evaluation could replace the kept checkpoint). A file that is really not a checkpoint still is."""
    import resource

    import torch

    from titan_rl.checkpoint import FORMAT
    from titan_rl.errors import TitanError
    from titan_rl.trainer.resume import resume_point

    cfg = make_config("logging.run_name=r", f"logging.checkpoint_path={tmp_path / 'c.pth'}")
    raw = config_to_dict(cfg)
    torch.save({"format": FORMAT, "config": raw, "policy": {}, "learner": {}, "counters": {}, "eval_returns": []}, tmp_path / "c_last.pth")
    assert resume_point(cfg)["config"]["logging"]["run_name"] == "r"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        with pytest.raises(OSError):
            while True:
                held.append(open(tmp_path / "c.pth.probe", "w"))  # held open on purpose
        with pytest.raises(TitanError, match="cannot read a checkpoint there: Too many open files"):
            resume_point(cfg)
    finally:
        for f in held:
            f.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    (tmp_path / "c_last.pth").write_text("hello\n")
    assert resume_point(cfg) is None
