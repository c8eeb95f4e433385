import pytest

from tests.helpers import DEFAULT_CONFIG, make_config
from titan_rl.config import config_from_dict, config_to_dict, load_config
from titan_rl.errors import ConfigError


def test_default_config_has_the_seed_keys():
    cfg = make_config()
    assert cfg.rollout_server.env_name == "CartPole-v1"
    assert cfg.rollout_server.num_workers >= 1
    assert cfg.policy.path == "models.simple_policy.SimplePolicy"
    assert cfg.policy.kwargs["state_dim"] == 4 and cfg.policy.kwargs["action_dim"] == 2
    assert 0 < cfg.train.lr and 0 <= cfg.train.gamma <= 1 and cfg.train.batch_size <= cfg.train.min_buffer_size


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.gamma=1.3", "cartpole.yaml: train.gamma=1.3 must be in [0, 1]"),
        ("train.gama=0.9", "cartpole.yaml: unknown key train.gama (did you mean train.gamma?)"),
        ("trian.lr=0.1", "unknown key trian"),
        ("train.batch_size=sixty", "train.batch_size='sixty' must be of type int"),
        ("train.batch_size=true", "must be of type int"),
        ("rollout_server.epsilon=[0.1, 0.2, 0.3]", "rollout_server.epsilon has 3 values but rollout_server.num_workers=2"),
        ("rollout_server.epsilon=1.5", "rollout_server.epsilon=1.5 must be in [0, 1]"),
        ("logging.wandb_mode=maybe", "logging.wandb_mode='maybe' must be one of offline, online, disabled"),
        ("policy.path=SimplePolicy", "policy.path='SimplePolicy' must be a dotted path"),
        ("train.min_buffer_size=10", "train.batch_size=64 exceeds train.min_buffer_size=10"),
        ("train=3", "cartpole.yaml: train must be a mapping of keys, got 3"),
    ],
)
def test_bad_values_name_the_file_the_key_and_the_reason(override, message):
    with pytest.raises(ConfigError) as e:
        make_config(override)
    assert message in str(e.value)


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(DEFAULT_CONFIG.read_text() + "\nbudget:\n  max_env_step: 10\n")
    with pytest.raises(ConfigError, match=r"mine.yaml: unknown key budget.max_env_step \(did you mean budget.max_env_steps\?\)"):
        load_config(path)


def test_missing_file_and_bad_yaml_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_overrides_parse_yaml_values_and_partial_sections_keep_defaults():
    cfg = make_config("train.lr=0.0005", "seed=3", "rollout_server.epsilon=[0.1, 0.5]", "budget.target_eval_return=null")
    assert cfg.train.lr == 0.0005 and cfg.seed == 3 and cfg.budget.target_eval_return is None
    assert cfg.epsilons() == [0.1, 0.5]
    assert cfg.train.gamma == make_config().train.gamma


def test_ints_are_accepted_for_floats_and_stored_as_floats():
    cfg = make_config("train.lr=1", "budget.max_wall_s=60")
    assert isinstance(cfg.train.lr, float) and isinstance(cfg.budget.max_wall_s, float)


def test_config_survives_the_round_trip_through_a_plain_dict():
    cfg = make_config("rollout_server.epsilon=[0.1, 0.5]")
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_the_kubernetes_config_map_holds_a_valid_config():
    import yaml

    from tests.helpers import REPO

    (config_map,) = yaml.safe_load_all((REPO / "deploy" / "k8s" / "config.yaml").read_text())
    cfg = config_from_dict(yaml.safe_load(config_map["data"]["cluster.yaml"]), "deploy/k8s/config.yaml")
    assert cfg.buffer_server.dial_address == "titan-buffer:50052" and cfg.trainer_server.host == "0.0.0.0"


def test_sample_messages_hold_whole_batches_of_about_rows_per_request():
    train = make_config("train.rows_per_request=2048").train
    assert train.batches_per_request() == 2048 // train.batch_size
    assert train.batches_per_request(256) == 8 and train.batches_per_request(300) == 6
    assert train.batches_per_request(4096) == 1  # never less than one batch


def test_a_key_whose_unit_changed_says_so_instead_of_suggesting_a_rename():
    with pytest.raises(ConfigError, match=r"train\.batches_per_request \(renamed: train\.rows_per_request counts rows"):
        make_config("train.batches_per_request=32")
