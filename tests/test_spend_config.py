"""The spend sections in the policy file: refused at start with file, key and reason
when a budget names what the policy does not have, or when the store cannot hold."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from extproc.config import ConfigError, check_workers, load_config

BASE = {
    "providers": {"mock": {"url": "http://127.0.0.1:1"}},
    "routes": [{"name": "v1", "prefix": "/v1/", "provider": "mock"}],
    "consumers": {"alice": {"keys": [{"value": "a" * 20}], "teams": ["research", "ops"]}},
}


def load(tmp_path: Path, **sections: object):
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump({**BASE, **sections}))
    return load_config(str(path))


def problems(tmp_path: Path, **sections: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, **sections)
    return caught.value.lines()


def budget(scope: str, match: str | None = None, **extra: object) -> dict:
    item = {"scope": scope, "limit_usd": 10, "period": "month", **extra}
    if match is not None:
        item["match"] = match
    return {"items": {"b": item}}


@pytest.mark.parametrize(
    ("scope", "match", "reason"),
    [
        ("consumer", "bob", "unknown consumer 'bob' (known: alice)"),
        ("team", "sales", "unknown team 'sales' (known: ops, research)"),
        ("route", "v2", "unknown route 'v2' (known: v1)"),
        ("model", "no-such-model-xyz", "unknown model 'no-such-model-xyz'"),
    ],
)
def test_a_budget_naming_what_the_policy_lacks_is_refused(tmp_path, scope, match, reason):
    [line] = problems(tmp_path, budgets=budget(scope, match))
    assert line.startswith(f"{tmp_path / 'policy.yaml'}: budgets.items.b.match: {reason}")


def test_known_names_and_priced_models_load(tmp_path):
    for scope, match in (
        ("consumer", "alice"),
        ("team", "ops"),
        ("route", "v1"),
        ("model", "gpt-4o-mini"),  # the bundled catalog prices it
        ("global", None),
    ):
        config = load(tmp_path, budgets=budget(scope, match))
        assert config.spend and config.budgets.items["b"].budget().scope == scope
    priced = load(
        tmp_path,
        budgets=budget("model", "house-llm"),
        prices={"models": [{"model": "house-llm", "input": 1, "output": 2}]},
    )
    assert priced.prices.book().price("mock", "house-llm")[1] == "priced"


def test_a_jwt_team_claim_lets_a_budget_name_any_team(tmp_path):
    jwt = {"jwt": {"shared_secret_env": "S", "team_claim": "groups"}}
    config = load(tmp_path, auth=jwt, budgets=budget("team", "anyone"))
    assert config.auth.jwt.team_claim == "groups"


def test_store_redis_needs_the_rate_limits_redis(tmp_path):
    [line] = problems(tmp_path, budgets={**budget("global"), "store": "redis"})
    assert "budgets.store: redis shares the rate limits' Redis" in line


def test_an_in_process_store_refuses_several_workers(tmp_path):
    config = load(tmp_path, budgets=budget("global"))
    [(key, reason)] = check_workers(config, 4)
    assert key == "budgets.store" and "4x every budget" in reason


def test_an_unpriced_stand_in_without_a_price_is_refused(tmp_path):
    [line] = problems(tmp_path, prices={"unpriced": "estimate-from: nothing-like-it"})
    assert "prices.unpriced: unpriced: estimate-from 'nothing-like-it' has no price" in line


def test_empty_sections_mean_defaults_and_typos_get_did_you_mean(tmp_path):
    config = load(tmp_path, ledger=None, prices=None)
    assert config.ledger.url == "sqlite:///data/ledger.sqlite3" and config.spend
    assert not load(tmp_path).spend  # none of the three: the stage is off
    [line] = problems(tmp_path, budgets={"itemz": {}})
    assert "budgets.itemz" in line and "items" in line
