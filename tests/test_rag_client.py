"""`llm-service rag`: chunking, the SQLite + sqlite-vec index through a fake embedder, the CLI
against a stub OpenAI server, and one run against a live server."""

from __future__ import annotations

import json
import random
import re
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pypdf
import pytest

from clients.rag import Index, RagError, chunk, main, spans
from tests.server_process import free_port

DIM = 128
STOP = {"the", "of", "is", "a", "an", "what", "and", "to", "in", "it", "for", "all"}
QUESTION = "What is the launch code of the Zephyr project?"


def fake_embed(texts: list[str]) -> list[list[float]]:
    """Hashed bag of words: texts sharing words are close. The last component keeps a text with
    no words from being a zero vector, which has no cosine distance."""
    out = []
    for text in texts:
        v = [0.0] * (DIM - 1) + [0.01]
        for w in re.findall(r"[a-z0-9]+", text.lower()):
            if w not in STOP:
                v[zlib.crc32(w.encode()) % (DIM - 1)] += 1.0
        out.append(v)
    return out


def write_pdf(path: Path, text: str) -> None:
    """A one-page PDF with a text stream, by hand: pypdf reads text but does not lay it out."""
    content = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = b"%PDF-1.4\n", []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (i, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    path.write_bytes(out)


def write_corpus(folder: Path) -> Path:
    (folder / "nested").mkdir(parents=True)
    (folder / "zephyr.md").write_text("# Zephyr\n\nThe Zephyr project builds small weather balloons.\n\n"
                                      "The launch code of the Zephyr project is 7421. Keep it secret.\n")
    (folder / "garden.txt").write_text("Tomatoes need full sun and regular watering. " * 12)
    (folder / "bread.md").write_text("Bread dough rises faster in a warm kitchen. Knead it ten minutes.\n")
    (folder / "nested" / "trains.markdown").write_text("Night trains cross the Alps through long tunnels.\n")
    write_pdf(folder / "saturn.pdf", "Saturn has the most spectacular rings of the planets.")
    return folder


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "docs")


def indexed(db: Path, corpus: Path) -> Index:
    idx = Index(db, create=True)
    for f in sorted(p for p in corpus.rglob("*") if p.is_file()):
        idx.update(f, fake_embed, "fake", size=200, overlap=40)
    return idx


def rows(idx: Index) -> tuple[list[Any], ...]:
    return tuple(list(idx.db.execute(sql)) for sql in (
        "SELECT id, path, sha256 FROM files ORDER BY id", "SELECT id, file_id, n FROM chunks ORDER BY id",
        "SELECT rowid FROM chunk_vectors ORDER BY rowid"))


def test_chunks_cover_the_text_and_overlap_as_configured() -> None:
    rng = random.Random(0)
    words = ["alpha", "be", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    sentences = [" ".join(rng.choices(words, k=rng.randint(4, 15))).capitalize() + "." for _ in range(120)]
    text = "\n\n".join(" ".join(sentences[i:i + 5]) for i in range(0, 120, 5))
    got = spans(text, 300, 60)
    assert got[0][0] == 0 and got[-1][1] == len(text)
    for (a1, b1), (a2, _) in zip(got, got[1:], strict=False):
        assert b1 - a1 <= 300 and a1 < a2
        assert 60 - len("epsilon") - 1 <= b1 - a2 <= 60  # shifted to the next word start at most
        assert a2 == 0 or text[a2 - 1].isspace()
        second_half = text[a1 + 150:a1 + 300]
        # a paragraph break if the second half has one, else a sentence end
        assert text[b1 - 2:b1] == ("\n\n" if "\n\n" in second_half else ". ")
    pieces = chunk(text, 300, 0)
    assert " ".join(pieces).split() == text.split()  # no overlap: every word exactly once


def test_text_without_breaks_is_cut_hard() -> None:
    assert spans("x" * 250, 100, 20) == [(0, 100), (80, 180), (160, 250)]
    assert chunk("   \n\n  ", 100, 20) == []


def test_the_hand_written_pdf_is_read_by_pypdf(tmp_path: Path) -> None:
    write_pdf(tmp_path / "a.pdf", "Saturn has rings.")
    assert pypdf.PdfReader(tmp_path / "a.pdf").pages[0].extract_text().strip() == "Saturn has rings."


def test_search_ranks_the_file_with_the_answer_first(tmp_path: Path, corpus: Path) -> None:
    idx = indexed(tmp_path / "rag.db", corpus)
    assert idx.count("files") == 5 and idx.count("chunks") == idx.count("chunk_vectors") > 5
    assert (idx.meta("model"), idx.meta("dimension")) == ("fake", str(DIM))
    hits = idx.search(QUESTION, fake_embed, k=3)
    assert len(hits) == 3 and hits[0].path.endswith("zephyr.md") and "7421" in hits[0].text
    assert [h.distance for h in hits] == sorted(h.distance for h in hits)
    assert idx.search("Which planet has rings?", fake_embed)[0].path.endswith("saturn.pdf")


def test_reindexing_unchanged_files_changes_nothing(tmp_path: Path, corpus: Path) -> None:
    idx = indexed(tmp_path / "rag.db", corpus)
    before = rows(idx)
    assert all(idx.update(f, fake_embed, "fake") is None for f in corpus.rglob("*.*"))
    assert rows(idx) == before


def test_a_changed_file_replaces_its_chunks(tmp_path: Path, corpus: Path) -> None:
    idx = indexed(tmp_path / "rag.db", corpus)
    garden = str((corpus / "garden.txt").resolve())
    old = {i for (i,) in idx.db.execute("SELECT c.id FROM chunks c JOIN files f ON f.id = c.file_id "
                                        "WHERE f.path = ?", (garden,))}
    assert len(old) > 1
    (corpus / "garden.txt").write_text("Cucumbers climb trellises.")
    assert idx.update(corpus / "garden.txt", fake_embed, "fake") == 1
    ids = {i for (i,) in idx.db.execute("SELECT rowid FROM chunk_vectors")}
    assert idx.count("chunks") == len(ids) and not old & {i for (i,) in idx.db.execute("SELECT id FROM chunks")}
    assert idx.one("SELECT chunks FROM files WHERE path = ?", (garden,)) == 1
    assert idx.search("cucumbers trellises", fake_embed, 1)[0].text == "Cucumbers climb trellises."


def test_deleted_files_stay_until_pruned(tmp_path: Path, corpus: Path) -> None:
    idx = indexed(tmp_path / "rag.db", corpus)
    chunks = idx.count("chunks")
    (corpus / "zephyr.md").unlink()
    gone = [str((corpus / "zephyr.md").resolve())]
    assert idx.missing() == gone and idx.count("chunks") == chunks
    assert idx.prune() == gone and idx.missing() == []
    assert idx.count("files") == 4 and idx.count("chunks") == idx.count("chunk_vectors") < chunks
    assert not idx.search(QUESTION, fake_embed)[0].path.endswith("zephyr.md")


def test_another_model_or_dimension_is_refused(tmp_path: Path, corpus: Path) -> None:
    idx = indexed(tmp_path / "rag.db", corpus)
    with pytest.raises(RagError, match="built with the embedding model fake"):
        Index(tmp_path / "rag.db").model("other")
    assert idx.model(None) == "fake"
    (corpus / "bread.md").write_text("Rye bread is dense.")
    before = rows(idx)
    with pytest.raises(RagError, match=f"holds {DIM}-dimensional vectors"):
        idx.update(corpus / "bread.md", lambda ts: [[1.0, 0.0]] * len(ts), "fake")
    assert rows(idx) == before  # the transaction rolled back
    with pytest.raises(RagError, match="no index at"):
        Index(tmp_path / "missing.db")


class _Stub(BaseHTTPRequestHandler):
    """An OpenAI server: a chat model listed after an embedding one, fake embeddings, one
    streamed answer; the chat requests are kept."""

    chats: list[dict[str, Any]] = []

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, body: bytes, kind: str = "application/json") -> None:
        self.send_response(200)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        cards = [{"id": m, "object": "model", "created": 0, "owned_by": "t", "kind": k}
                 for m, k in (("all-minilm-l6-v2", "embed"), ("chat-model", "generate"))]
        self._send(json.dumps({"object": "list", "data": cards}).encode())

    def do_POST(self) -> None:
        req = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if self.path.endswith("/embeddings"):
            data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(fake_embed(req["input"]))]
            self._send(json.dumps({"object": "list", "data": data, "model": req["model"],
                                   "usage": {"prompt_tokens": 0, "total_tokens": 0}}).encode())
            return
        self.chats.append(req)
        part = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": req["model"],
                "choices": [{"index": 0, "delta": {"content": "It is 7421 [1]."}, "finish_reason": None}]}
        self._send(f"data: {json.dumps(part)}\n\ndata: [DONE]\n\n".encode(), "text/event-stream")


@pytest.fixture
def stub() -> Iterator[str]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def test_cli_index_search_ask_stats(stub: str, tmp_path: Path, corpus: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    (corpus / "notes.docx").write_text("not read")
    db, url = str(tmp_path / "rag.db"), ["--base-url", stub]
    assert main([*url, "index", str(corpus), "--db", db, "--chunk-size", "200", "--overlap", "40"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("5 files indexed, 0 unchanged,") and "skipped" in err and "notes.docx" in err
    assert main(["index", str(corpus), "--db", db, *url]) == 0  # flags after the command too
    out, err = capsys.readouterr()
    assert out == "0 files indexed, 5 unchanged, 0 chunks added\n" and err.count("unchanged") == 5
    assert main([*url, "search", QUESTION, "--db", db, "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert re.match(r"\[1\] \S*zephyr\.md#0 \(distance 0\.\d{3}\)\n", out) and out.count("(distance") == 2
    assert main([*url, "ask", QUESTION, "--db", db, "--max-tokens", "8", "--show-context"]) == 0
    out = capsys.readouterr().out
    answer = out.index("It is 7421 [1].\n\nsources:\n[1] ")
    assert 0 < out.index("7421. Keep it secret") < answer and "zephyr.md#0" in out[answer:]
    sent = _Stub.chats[-1]
    assert sent["model"] == "chat-model" and sent["max_tokens"] == 8 and sent["stream"] is True
    assert "The launch code of the Zephyr project is 7421" in sent["messages"][0]["content"]
    assert main([*url, "ask", QUESTION, "--db", db, "--no-answer", "-k", "1"]) == 0
    assert capsys.readouterr().out.startswith("[1] ") and _Stub.chats[-1] is sent  # no chat request
    assert main(["stats", "--db", db]) == 0
    assert re.search(r"files +5\n.*model +all-minilm-l6-v2\ndimension +128", capsys.readouterr().out, re.S)


def test_cli_errors_are_one_line(stub: str, tmp_path: Path, corpus: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "rag.db")
    assert main(["search", "x", "--db", db]) == 2
    assert "no index at" in capsys.readouterr().err
    assert main(["--base-url", stub, "index", str(corpus / "bread.md"), "--db", db]) == 0
    assert main(["--base-url", stub, "index", str(corpus), "--db", db, "--embedding-model", "e5"]) == 2
    assert main(["--base-url", stub, "index", str(tmp_path / "nowhere"), "--db", db]) == 2
    dead = f"http://127.0.0.1:{free_port()}/v1"
    assert main(["--base-url", dead, "--retries", "0", "search", "bread", "--db", db]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 4 and "Traceback" not in "".join(errors)
    assert "built with the embedding model all-minilm-l6-v2" in errors[1]
    assert "no such file or folder" in errors[2] and "cannot reach the server" in errors[3]


def test_rag_against_a_live_server(embedding_server: Any, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    folder, db = tmp_path / "docs", str(tmp_path / "rag.db")
    folder.mkdir()
    (folder / "zephyr.md").write_text("The launch code of the Zephyr project is 7421.\n")
    (folder / "garden.txt").write_text("Tomatoes need full sun and regular watering.\n")
    (folder / "bread.md").write_text("Bread dough rises faster in a warm kitchen.\n")
    (folder / "trains.txt").write_text("Night trains cross the Alps through long tunnels.\n")
    url = ["--base-url", embedding_server.base_url]
    assert main([*url, "index", str(folder), "--db", db]) == 0
    assert capsys.readouterr().out.startswith("4 files indexed, 0 unchanged")
    assert main([*url, "search", QUESTION, "--db", db]) == 0
    assert "zephyr.md#0" in capsys.readouterr().out.splitlines()[0]
    assert main([*url, "index", str(folder), "--db", db]) == 0
    assert capsys.readouterr().out.startswith("0 files indexed, 4 unchanged, 0 chunks added")
    assert main([*url, "ask", QUESTION, "--db", db, "--model", "smollm2-135m-instruct",
                 "--max-tokens", "16"]) == 0
    out = capsys.readouterr().out
    sources = out[out.index("\nsources:\n"):].splitlines()[2:]
    assert len(sources) == 4 and "zephyr.md#0" in sources[0]
