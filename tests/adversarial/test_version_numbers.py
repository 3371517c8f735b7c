"""Version numbers (issue 19, class 10): a version is a whole number from 1 to 999,999,999 in ASCII digits
without leading zeros, everywhere: `name@N` references, folder names, S3 keys (test_s3_hostile.py),
manifests and claims. Any other spelling is refused with a message saying the rule, and a name whose
numbers are used up refuses the next publish instead of reporting a version nobody can list or serve.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hostile_versions import NOT_VERSIONS

from loraplex_adapters.manifest import MAX_VERSION, Manifest, check_manifest, parse_reference
from loraplex_adapters.peft_folder import AdapterFormatError
from loraplex_adapters.store import AdapterStore, VersionsExhausted

GEN = "gen_qv_r4"



@pytest.mark.parametrize("version", [1, 7, 42, MAX_VERSION])
def test_every_version_in_range_parses_back_to_itself(version):
    assert parse_reference(f"replies@{version}") == ("replies", version)
    assert check_manifest(Manifest("replies", version)).version == version


@pytest.mark.parametrize("text", NOT_VERSIONS)
def test_a_reference_with_any_other_version_is_refused_with_the_rule(text):
    with pytest.raises(AdapterFormatError, match="a version is a whole number from 1 to 999999999"):
        parse_reference(f"replies@{text}")


@pytest.mark.parametrize("version", [0, -1, MAX_VERSION + 1, 10**40, True, "3", 3.0, None])
def test_a_manifest_with_any_other_version_is_refused(version):
    with pytest.raises(AdapterFormatError, match="invalid version"):
        check_manifest(Manifest("replies", version))


@pytest.fixture
def store(tmp_path, tiny):
    store = AdapterStore(tmp_path / "store")
    store.publish(tiny("llama")[1][GEN][0], "replies")
    return store


def hand_place(store: AdapterStore, folder_name: str, version: object) -> Path:
    """Copy replies@1 to `adapters/replies/<folder_name>` with its manifest naming `version`, as an
    operator copying folders by hand would."""
    target = store.root / "adapters" / "replies" / folder_name
    shutil.copytree(store.root / "adapters" / "replies" / "1", target)
    manifest = json.loads((target / "loraplex.json").read_text())
    (target / "loraplex.json").write_text(json.dumps({**manifest, "version": version}))
    return target


@pytest.mark.parametrize("text", [t for t in NOT_VERSIONS if t and "\n" not in t])
def test_a_folder_named_with_any_other_version_is_ignored_and_publish_goes_on(store, tiny, text, caplog):
    hand_place(store, text, int(text) if text.isascii() and text.strip().isdigit() else 5)
    with caplog.at_level("WARNING", logger="loraplex_adapters.store"):
        reopened = AdapterStore(store.root)
        assert [(m.name, m.version) for m in reopened.list()] == [("replies", 1)]
    assert any("is ignored" in r.getMessage() and "from 1 to 999999999" in r.getMessage() for r in caplog.records)
    published = reopened.publish(tiny("llama")[1][GEN][0], "replies")
    assert published.version == 2
    assert [(m.name, m.version) for m in AdapterStore(store.root).list()] == [("replies", 1), ("replies", 2)]
    assert reopened.load("replies", 2)[0].version == 2


def test_the_highest_version_is_listed_and_served_and_then_publish_is_refused(store, tiny):
    hand_place(store, str(MAX_VERSION), MAX_VERSION)
    reopened = AdapterStore(store.root)
    assert [m.version for m in reopened.list()] == [1, MAX_VERSION]
    assert reopened.lookup("replies").version == MAX_VERSION
    assert reopened.load(*parse_reference(f"replies@{MAX_VERSION}"))[0].version == MAX_VERSION
    with pytest.raises(VersionsExhausted, match="used every version number up to 999999999"):
        reopened.publish(tiny("llama")[1][GEN][0], "replies")
    assert [m.version for m in AdapterStore(store.root).list()] == [1, MAX_VERSION]
    assert reopened.publish(tiny("llama")[1][GEN][0], "replies2").version == 1  # other names are unaffected


@pytest.mark.parametrize(("claim", "refused"), [(str(MAX_VERSION), True), ("99999999999999", True),
                                                 ("41", False), ("0041", False), ("not a number", False)])
def test_a_claim_at_or_past_the_bound_refuses_publish(store, tiny, claim, refused):
    (store.root / "claims" / "replies").write_text(claim + "\n")
    publish = lambda: store.publish(tiny("llama")[1][GEN][0], "replies")  # noqa: E731
    if refused:
        with pytest.raises(VersionsExhausted):
            publish()
        assert [m.version for m in store.list()] == [1]
    else:
        assert publish().version == (42 if claim.strip().isdigit() else 2)


@pytest.mark.parametrize("text", ["0", "07", "1000000000", "٣", " 3"])
def test_a_lookup_of_any_other_version_never_reaches_the_store(store, text):
    with pytest.raises(AdapterFormatError):
        store.lookup(*parse_reference(f"replies@{text}"))


def test_each_refusal_has_its_status():
    """What a client sees: a bad spelling is its mistake, used-up numbers are a limit, damage is a miss."""
    import grpc

    from loraplex_adapters.store import AdapterQuarantined
    from loraplex_server.api.status import status_of

    with pytest.raises(AdapterFormatError) as bad:
        parse_reference("replies@07")
    assert status_of(bad.value).code == grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(VersionsExhausted("used up")).code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_of(AdapterQuarantined("damaged")).code == grpc.StatusCode.NOT_FOUND
