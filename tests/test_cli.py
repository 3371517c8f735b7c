"""The `loraplex` CLI against a real server: connection flags anywhere, every sampling flag, help, chat, base."""

from __future__ import annotations

import argparse
import io
import shutil

import pytest
from chat_base import chat_base, rendered
from server_process import free_port, start_server

from loraplex.cli import build_parser
from loraplex.cli import main as cli_main
from loraplex.cli_options import HelpFormatter

GEN, CLS = "gen_qv_r4", "cls3_r2"
SAMPLING = ["--max-tokens", "--temperature", "--top-p", "--top-k", "--stop", "--seed"]
CLASSIFICATION_ONLY = ["--text-field", "--label-field", "--labels"]
GENERATION_ONLY = ["--prompt-field", "--completion-field", "--messages-field"]


@pytest.fixture(scope="module")
def server(tiny, adapter_dir, tmp_path_factory):
    """(client, target) of a server on the tiny Llama base plus a chat template, over a copy of the store."""
    root = tmp_path_factory.mktemp("cli")
    base = chat_base(tiny("llama")[0], root / "base")
    store = shutil.copytree(adapter_dir, root / "store")
    port = free_port()
    process, client = start_server(base, store, port, client_kwargs={"timeout": 60})
    yield client, f"127.0.0.1:{port}"
    client.close()
    process.kill()
    process.wait()


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_connection_flags_work_after_the_subcommand_and_the_later_one_wins(server, capsys, monkeypatch):
    _, target = server
    monkeypatch.delenv("LORAPLEX_SERVER", raising=False)
    code, out, _ = run(capsys, "classify", "--adapter", CLS, "hello world", "--server", target)
    assert code == 0 and out.startswith(f"{CLS}-")
    code, out, _ = run(capsys, "--server", "127.0.0.1:1", "health", "--server", target, "--timeout", "30")
    assert (code, out) == (0, "SERVING\n")
    code, _, err = run(capsys, "--server", target, "health", "--server", "127.0.0.1:1", "--timeout", "5")
    assert code == 2 and "UNAVAILABLE" in err
    code, out, _ = run(capsys, "--server", target, "adapters", "show", f"{GEN}@1", "--timeout", "30")
    assert code == 0 and '"version": 1' in out
    monkeypatch.setenv("LORAPLEX_SERVER", target)
    assert run(capsys, "health")[:2] == (0, "SERVING\n")


def test_generate_sampling_flags_reach_the_server(server, capsys):
    client, target = server
    sampled = ["generate", "hello", "--adapter", GEN, "--server", target, "--temperature", "1.0", "--max-tokens", "12"]
    first, again = run(capsys, *sampled, "--seed", "7"), run(capsys, *sampled, "--seed", "7")
    assert first[0] == 0 and first[1] == again[1]
    expected = client.generate("hello", adapter=GEN, temperature=1.0, max_tokens=12, seed=7)
    assert first[1] == expected.text
    sdk = client.generate("hello", adapter=GEN, temperature=0.7, top_p=0.5, top_k=3, max_tokens=12, seed=3)
    code, out, _ = run(capsys, "generate", "hello", "--adapter", GEN, "--server", target, "--temperature", "0.7",
                       "--top-p", "0.5", "--top-k", "3", "--max-tokens", "12", "--seed", "3")
    assert out == sdk.text
    greedy = client.generate("hello", adapter=GEN, max_tokens=12)
    assert run(capsys, "generate", "hello", "--adapter", GEN, "--server", target, "--max-tokens", "12",
               "--temperature", "1.0", "--top-k", "1", "--seed", "5")[1] == greedy.text


def test_generate_stop_and_max_tokens(server, capsys):
    client, target = server
    greedy = client.generate("hello", adapter=GEN, max_tokens=12)
    stop = greedy.text[len(greedy.text) // 2:][:2]
    assert stop.strip(), f"no usable stop text in {greedy.text!r}"
    code, out, err = run(capsys, "generate", "hello", "--adapter", GEN, "--server", target, "--max-tokens", "12",
                         "--stop", "never-there", "--stop", stop)
    assert code == 0 and out == greedy.text[:greedy.text.index(stop)]
    assert "[stop:" in err
    code, out, err = run(capsys, "generate", "hello", "--adapter", GEN, "--server", target, "--max-tokens", "3")
    assert "[length:" in err and "+ 3 completion tokens" in err


def test_invalid_sampling_values_are_refused_with_the_server_message(server, capsys):
    code, _, err = run(capsys, "generate", "hello", "--server", server[1], "--top-p", "1.5")
    assert code == 2 and "INVALID_ARGUMENT" in err and "top_p" in err


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exited:
        cli_main([*argv, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


def test_each_subcommand_lists_only_its_own_options(capsys):
    generate = _help(capsys, "generate")
    assert all(flag in generate for flag in SAMPLING) and "(default: 64)" in generate
    classify = _help(capsys, "classify")
    assert "--server" in classify and not any(flag in classify for flag in SAMPLING)
    chat = _help(capsys, "chat")
    assert all(flag in chat for flag in [*SAMPLING, "--message", "--system"]) and "(default: 256)" in chat
    classification = _help(capsys, "train", "classification")
    assert all(f in classification for f in CLASSIFICATION_ONLY) and not any(f in classification for f in
                                                                             [*GENERATION_ONLY, "--temperature"])
    generation = _help(capsys, "train", "generation")
    assert all(f in generation for f in GENERATION_ONLY) and not any(f in generation for f in CLASSIFICATION_ONLY)


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def test_every_option_has_help_and_shows_its_default():
    from loraplex_adapters.base_cli import build_parser as base_parser
    from loraplex_adapters.publish_cli import build_parser as publish_parser
    from loraplex_adapters.train_cli import build_parser as train_parser
    from loraplex_server.app.options import build_parser as serve_parser

    extras = [serve_parser(), train_parser(), publish_parser(), base_parser()]
    for parser in [*_parsers(build_parser()), *(p for extra in extras for p in _parsers(extra))]:
        formatter = HelpFormatter(parser.prog)
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{parser.prog} {action.option_strings[0]} has no help"
            flag = isinstance(action, argparse._StoreTrueAction) and action.default is not argparse.SUPPRESS
            shown = formatter._get_help_string(action)
            assert flag or action.required or "default" in shown, f"{parser.prog} {action.option_strings[0]}: {shown}"


def test_upload_without_labels_names_the_labels_flag(server, tiny, capsys):
    folder = tiny("llama")[1][CLS][0]
    code, _, err = run(capsys, "adapters", "upload", str(folder), "--name", "unlabelled", "--server", server[1])
    assert code == 2 and "--labels" in err
    assert "unlabelled" not in run(capsys, "adapters", "list", "--server", server[1])[1]


def test_chat_one_shot_keeps_the_history(server, capsys):
    client, target = server
    code, out, _ = run(capsys, "chat", "--adapter", GEN, "--server", target, "--system", "be brief",
                       "-m", "hello world", "-m", "the end", "--max-tokens", "6")
    assert code == 0
    history = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    first = client.chat(history, adapter=GEN, max_tokens=6)
    history += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "the end"}]
    second = client.chat(history, adapter=GEN, max_tokens=6)
    assert out == f"{first.text}\n{second.text}\n"
    # The template is applied by the server: the same as generating from the rendered text.
    assert second.token_ids == client.generate(rendered(history), adapter=GEN, max_tokens=6).token_ids


def test_chat_reads_turns_from_stdin_until_exit(server, capsys, monkeypatch):
    client, target = server
    monkeypatch.setattr("sys.stdin", io.StringIO("hello world\n\n/exit\nnever sent\n"))
    code, out, _ = run(capsys, "chat", "--adapter", GEN, "--server", target, "--max-tokens", "5")
    reply = client.chat([("user", "hello world")], adapter=GEN, max_tokens=5)
    assert (code, out) == (0, f"{reply.text}\n")


def test_chat_refusals_are_one_line_errors(server, capsys):
    code, _, err = run(capsys, "chat", "--adapter", "missing", "--server", server[1], "-m", "hi")
    assert code == 2 and err.startswith("error: NOT_FOUND") and "Traceback" not in err


def test_base_path_and_export(tmp_path, capsys, monkeypatch):
    """Against a cache that holds a converted base (the conversion itself: test_embedded_default)."""
    cached = tmp_path / "cache" / "smollm2-135m-instruct"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    (cached / "model.safetensors").write_bytes(b"weights")
    monkeypatch.setenv("LORAPLEX_CACHE_DIR", str(tmp_path / "cache"))
    assert run(capsys, "base", "path")[:2] == (0, f"{cached}\n")
    target = tmp_path / "exported"
    assert run(capsys, "base", "export", str(target))[:2] == (0, f"{target}\n")
    assert (target / "model.safetensors").read_bytes() == b"weights"
    code, _, err = run(capsys, "base", "export", str(target))
    assert code == 2 and "not an empty folder" in err
