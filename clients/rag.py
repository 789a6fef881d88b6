"""Retrieval-augmented answers over your files, for any OpenAI-compatible server.

    llm-service rag index docs/ notes.md paper.pdf     # chunk, embed and store in rag.db
    llm-service rag search "how do I rotate the keys?" # the closest chunks, ranked
    llm-service rag ask "how do I rotate the keys?"    # an answer from those chunks, with sources
    llm-service rag stats

Files are .txt, .md/.markdown and .pdf; folders are read recursively. Re-indexing skips files
whose content is unchanged and replaces the chunks of changed ones; files that were deleted stay
in the index until `index --prune`. A database keeps the embedding model it was built with:
searching it embeds the question with that model, and indexing it with another is refused.
Changing --chunk-size or --overlap only affects files that change: use a new --db to re-chunk.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apsw
import openai
import pypdf
import sqlite_vec
from pypdf.errors import PyPdfError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from tenacity import Retrying, retry_if_exception, stop_after_attempt

from clients import chat
from clients.chat import retry_wait, retryable

DEFAULT_BASE_URL = chat.DEFAULT_BASE_URL
DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"
SUFFIXES = (".txt", ".md", ".markdown", ".pdf")
SYSTEM = ("Answer the question using only the numbered context passages below, and cite the "
          "passages you use as [n]. If they do not contain the answer, say that you do not know.")

Embed = Callable[[list[str]], list[list[float]]]


class RagError(Exception):
    """A failure to explain to the person in one line; `code` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Hit:
    path: str
    n: int
    text: str
    distance: float

    def line(self, rank: int) -> str:
        return f"[{rank}] {shown(self.path)}#{self.n} (distance {self.distance:.3f})"


def shown(path: str) -> str:
    """A stored (absolute) path, relative to the current folder when it is inside it."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def spans(text: str, size: int, overlap: int) -> list[tuple[int, int]]:
    """Windows of at most `size` characters covering `text`. Each ends at the last paragraph
    break in its second half, else a sentence end, else a space; the next starts at most
    `overlap` characters before that end, at the start of a word."""
    out: list[tuple[int, int]] = []
    start, n = 0, len(text)
    while start < n:
        end = min(start + size, n)
        if end < n:
            end = _boundary(text, start + size // 2, end)
        out.append((start, end))
        if end == n:
            break
        nxt = max(end - overlap, start + 1)
        if 0 < nxt < end and not text[nxt - 1].isspace():
            # a window that starts mid-word embeds a fragment: move to the next word
            space = re.compile(r"\s+").search(text, nxt, end)
            nxt = space.end() if space else nxt
        start = nxt
    return out


def _boundary(text: str, lo: int, hi: int) -> int:
    for seps in (["\n\n"], [". ", "! ", "? ", ".\n", "\n"], [" ", "\t"]):
        ends = [i + len(s) for s in seps if (i := text.rfind(s, lo, hi)) >= 0]
        if ends:
            return max(ends)
    return hi


def chunk(text: str, size: int = 800, overlap: int = 150) -> list[str]:
    return [piece for a, b in spans(text, size, overlap) if (piece := text[a:b].strip())]


def extract(path: Path, data: bytes) -> str:
    if path.suffix.lower() == ".pdf":
        # from the bytes that were hashed, so the stored sha256 matches the stored text
        pages = pypdf.PdfReader(io.BytesIO(data)).pages
        return "\n\n".join(page.extract_text() or "" for page in pages)
    return data.decode("utf-8", errors="replace").replace("\r\n", "\n")


def discover(paths: list[str]) -> tuple[list[Path], list[Path]]:
    """The files to index under `paths`, and the ones skipped for their type."""
    found: list[Path] = []
    skipped: list[Path] = []
    for name in paths:
        p = Path(name).expanduser()
        if p.is_dir():
            # hidden folders (.git, .venv) are someone's machinery, not documents
            files = [f for f in sorted(p.rglob("*")) if f.is_file()
                     and not any(part.startswith(".") for part in f.relative_to(p).parts)]
        elif p.is_file():
            files = [p]
        else:
            raise RagError(f"no such file or folder: {name}", 2)
        for f in files:
            (found if f.suffix.lower() in SUFFIXES else skipped).append(f.resolve())
    return list(dict.fromkeys(found)), skipped


class Index:
    """Chunks and their vectors in one SQLite file: `files` and `chunks` are ordinary tables,
    `chunk_vectors` is a sqlite-vec vec0 table whose rowid is the chunk's id."""

    def __init__(self, path: Path, *, create: bool = False) -> None:
        if not create and not path.exists():
            raise RagError(f"no index at {path}: run `llm-service rag index PATH` first", 2)
        self.path = path
        self.db = apsw.Connection(str(path))
        self.db.enable_load_extension(True)
        self.db.load_extension(sqlite_vec.loadable_path())
        self.db.enable_load_extension(False)
        with self.db:
            self.db.execute("""
                CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS files (id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE,
                    sha256 TEXT NOT NULL, mtime REAL NOT NULL, chunks INTEGER NOT NULL);
                CREATE TABLE IF NOT EXISTS chunks (id INTEGER PRIMARY KEY,
                    file_id INTEGER NOT NULL REFERENCES files(id), n INTEGER NOT NULL,
                    text TEXT NOT NULL, UNIQUE (file_id, n));""")

    def meta(self, key: str) -> str | None:
        value = self.one("SELECT value FROM meta WHERE key = ?", (key,))
        return None if value is None else str(value)

    def one(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        row = self.db.execute(sql, params).fetchone()
        return None if row is None else row[0]

    def count(self, table: str) -> int:
        return int(self.one(f"SELECT count(*) FROM {table}"))

    def model(self, wanted: str | None) -> str:
        """The embedding model to use: the one the index was built with, refusing another."""
        have = self.meta("model")
        if wanted and have and wanted != have:
            raise RagError(f"{self.path} was built with the embedding model {have} "
                           f"({self.meta('dimension')} dimensions), not {wanted}: "
                           f"use --embedding-model {have}, or another --db", 2)
        return wanted or have or DEFAULT_EMBEDDING_MODEL

    def _check_dimension(self, dim: int, model: str) -> None:
        have = self.meta("dimension")
        if have is None:
            self.db.execute("INSERT INTO meta VALUES ('model', ?), ('dimension', ?)", (model, str(dim)))
            self.db.execute(f"CREATE VIRTUAL TABLE chunk_vectors USING vec0("
                            f"embedding float[{dim}] distance_metric=cosine)")
        elif int(have) != dim:
            raise RagError(f"{self.path} holds {have}-dimensional vectors but {model} returned "
                           f"{dim} dimensions: use another --db", 2)

    def update(self, path: Path, embed: Embed, model: str, size: int = 800, overlap: int = 150,
               batch: int = 32, report: Callable[[int, int], None] | None = None) -> int | None:
        """Index one file: None when its content is unchanged, else the number of chunks it
        now has. `report(done, total)` follows the embedding of its chunks."""
        self.model(model)
        key = str(path.resolve())
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        row = self.db.execute("SELECT id, sha256 FROM files WHERE path = ?", (key,)).fetchone()
        if row is not None and row[1] == sha:
            return None
        texts = chunk(extract(path, data), size, overlap)
        # embed before the transaction: a slow server must not hold the database's write lock
        vectors: list[list[float]] = []
        for i in range(0, len(texts), batch):
            vectors += embed(texts[i:i + batch])
            if report:
                report(len(vectors), len(texts))
        with self.db:
            if vectors:
                self._check_dimension(len(vectors[0]), model)
            if row is not None:
                self._forget(int(row[0]))
            file_id = self.one("INSERT INTO files (path, sha256, mtime, chunks) VALUES (?, ?, ?, ?) "
                               "RETURNING id", (key, sha, path.stat().st_mtime, len(texts)))
            for n, (text, vector) in enumerate(zip(texts, vectors, strict=True)):
                chunk_id = self.one("INSERT INTO chunks (file_id, n, text) VALUES (?, ?, ?) RETURNING id",
                                    (file_id, n, text))
                self.db.execute("INSERT INTO chunk_vectors (rowid, embedding) VALUES (?, ?)",
                                (chunk_id, sqlite_vec.serialize_float32(vector)))
        return len(texts)

    def _forget(self, file_id: int) -> None:
        if self.meta("dimension") is not None:
            self.db.execute("DELETE FROM chunk_vectors WHERE rowid IN "
                            "(SELECT id FROM chunks WHERE file_id = ?)", (file_id,))
        self.db.execute("DELETE FROM chunks WHERE file_id = ?", (file_id,))
        self.db.execute("DELETE FROM files WHERE id = ?", (file_id,))

    def missing(self) -> list[str]:
        return [str(p) for (p,) in self.db.execute("SELECT path FROM files ORDER BY path")
                if not Path(str(p)).exists()]

    def prune(self) -> list[str]:
        """Forget the files that no longer exist."""
        gone = self.missing()
        with self.db:
            for path in gone:
                self._forget(int(self.one("SELECT id FROM files WHERE path = ?", (path,))))
        return gone

    def search(self, query: str, embed: Embed, k: int = 4) -> list[Hit]:
        if self.count("chunks") == 0:
            raise RagError(f"the index {self.path} is empty: run `llm-service rag index PATH` first", 2)
        [vector] = embed([query])
        self._check_dimension(len(vector), self.meta("model") or "")
        rows = self.db.execute("""
            SELECT f.path, c.n, c.text, v.distance
            FROM (SELECT rowid, distance FROM chunk_vectors WHERE embedding MATCH ? AND k = ?) v
            JOIN chunks c ON c.id = v.rowid JOIN files f ON f.id = c.file_id
            ORDER BY v.distance IS NULL, v.distance""", (sqlite_vec.serialize_float32(vector), k))
        # a zero vector has no cosine distance (NULL): rank it last, as unrelated
        return [Hit(str(p), int(n), str(t), 1.0 if d is None else float(d)) for p, n, t, d in rows]


def server_embedder(client: openai.OpenAI, model: str, retrying: Retrying) -> Embed:
    def embed(texts: list[str]) -> list[list[float]]:
        r = retrying(client.embeddings.create, model=model, input=texts)
        return [list(d.embedding) for d in sorted(r.data, key=lambda d: d.index)]
    return embed


def chat_model(client: openai.OpenAI, retrying: Retrying, embedding_model: str) -> str:
    """The first model that generates: our cards say `kind`, other servers' may not."""
    for m in retrying(client.models.list).data:
        if (m.model_extra or {}).get("kind") != "embed" and m.id != embedding_model:
            return str(m.id)
    raise RagError("the server lists no chat model: pass --model", 2)


def explain(e: openai.APIError, base_url: str) -> str:
    if isinstance(e, openai.NotFoundError):
        return f"not found: {e.message}. --model and --embedding-model pick others."
    return chat.explain(e, base_url)


def run_index(args: argparse.Namespace, idx: Index, embed: Embed, model: str, err: Console) -> int:
    files, skipped = discover(args.paths)
    for f in skipped:
        err.print(f"[yellow]warning:[/yellow] skipped {escape(shown(str(f)))}: not .txt, .md or .pdf")
    indexed = unchanged = added = 0
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err, disable=not err.is_terminal) as bar:
        files_bar, chunks_bar = bar.add_task("files", total=len(files)), bar.add_task("chunks", total=0)
        for f in files:
            def report(done: int, total: int, base: int = added) -> None:
                bar.update(chunks_bar, completed=base + done, total=base + total)

            try:
                n = idx.update(f, embed, model, args.chunk_size, args.overlap, args.batch_size, report)
            except (OSError, PyPdfError) as e:
                err.print(f"[yellow]warning:[/yellow] skipped {escape(shown(str(f)))}: {escape(str(e))}")
                continue
            finally:
                bar.advance(files_bar)
            if n is None:
                unchanged += 1
            else:
                indexed, added = indexed + 1, added + n
            err.print(f"{'unchanged' if n is None else f'indexed ({n} chunks)'} {shown(str(f))}", markup=False)
    pruned = idx.prune() if args.prune else []
    if not args.prune and (gone := idx.missing()):
        err.print(f"{len(gone)} indexed files no longer exist; --prune forgets them")
    tail = f", {len(pruned)} pruned" if args.prune else ""
    print(f"{indexed} files indexed, {unchanged} unchanged, {added} chunks added{tail}")
    return 0


def show_hits(hits: list[Hit]) -> None:
    for rank, h in enumerate(hits, 1):
        print(h.line(rank))
        print("    " + h.text.replace("\n", "\n    ") + "\n")


def run_ask(args: argparse.Namespace, hits: list[Hit], client: openai.OpenAI, retrying: Retrying,
            embedding_model: str) -> int:
    if args.show_context:
        show_hits(hits)
    context = "\n\n".join(f"[{i}] {shown(h.path)}#{h.n}\n{h.text}" for i, h in enumerate(hits, 1))
    kwargs: dict[str, Any] = dict(
        model=args.model or chat_model(client, retrying, embedding_model), stream=True,
        temperature=args.temperature,
        messages=[{"role": "system", "content": f"{SYSTEM}\n\n{context}"},
                  {"role": "user", "content": args.question}])
    if args.max_tokens:
        kwargs["max_tokens"] = args.max_tokens
    # retried only while opening: once tokens flow, a failure is reported, not replayed
    stream: Any = retrying(client.chat.completions.create, **kwargs)
    answer = ""
    try:
        for part in stream:
            if part.choices and (piece := part.choices[0].delta.content):
                answer += piece
                sys.stdout.write(piece)
                sys.stdout.flush()
    finally:
        stream.close()  # also on Ctrl-C: closing the connection stops the generation
    print("" if answer.endswith("\n") else "\n", end="")
    print("\nsources:")
    for rank, h in enumerate(hits, 1):
        print(h.line(rank))
    return 0


def parser() -> argparse.ArgumentParser:
    # connection flags are read before or after the command: SUPPRESS keeps one from erasing the other
    conn = argparse.ArgumentParser(add_help=False)
    conn.add_argument("--base-url", default=argparse.SUPPRESS, help=f"default: $OPENAI_BASE_URL or {DEFAULT_BASE_URL}")
    conn.add_argument("--api-key", default=argparse.SUPPRESS, help="default: $OPENAI_API_KEY")
    conn.add_argument("--retries", type=int, default=argparse.SUPPRESS, help="for connection errors, 429 and 503 (default 4)")
    store = argparse.ArgumentParser(add_help=False, parents=[conn])
    store.add_argument("--db", type=Path, default=Path("rag.db"), help="the index file (default: rag.db)")
    store.add_argument("--embedding-model", default=None,
                       help=f"default: the index's own, or {DEFAULT_EMBEDDING_MODEL} for a new one")
    p = argparse.ArgumentParser(prog="llm-service rag", description=__doc__, parents=[conn],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    ix = sub.add_parser("index", parents=[store], help="chunk, embed and store files")
    ix.add_argument("paths", nargs="+", metavar="PATH")
    ix.add_argument("--chunk-size", type=int, default=800, help="characters per chunk (default 800)")
    ix.add_argument("--overlap", type=int, default=150, help="characters shared by neighbours (default 150)")
    ix.add_argument("--batch-size", type=int, default=32, help="chunks per embeddings request")
    ix.add_argument("--prune", action="store_true", help="forget indexed files that no longer exist")
    for name, what in (("search", "the closest chunks"), ("ask", "an answer from the closest chunks")):
        q = sub.add_parser(name, parents=[store], help=what)
        q.add_argument("question", metavar="QUERY")
        q.add_argument("-k", type=int, default=4, help="chunks to retrieve (default 4)")
    ask = sub.choices["ask"]
    ask.add_argument("--model", default=None, help="chat model (default: the first chat model the server lists)")
    ask.add_argument("--max-tokens", type=int, default=None)
    ask.add_argument("--temperature", type=float, default=0.0)
    ask.add_argument("--show-context", action="store_true", help="print the chunks before the answer")
    ask.add_argument("--no-answer", action="store_true", help="print the chunks only, like search")
    sub.add_parser("stats", parents=[store], help="what the index holds")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    base_url = getattr(args, "base_url", None) or os.environ.get("OPENAI_BASE_URL", DEFAULT_BASE_URL)
    api_key = getattr(args, "api_key", None) or os.environ.get("OPENAI_API_KEY", "none")
    if args.command == "index" and not 0 <= args.overlap < args.chunk_size:
        p.error("--overlap must be at least 0 and less than --chunk-size")
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=600)
    retrying = Retrying(retry=retry_if_exception(retryable), wait=retry_wait,
                        stop=stop_after_attempt(getattr(args, "retries", 4) + 1), reraise=True)
    err = Console(stderr=True, soft_wrap=True)  # an error stays one line, however long
    try:
        idx = Index(args.db, create=args.command == "index")
        model = idx.model(args.embedding_model)
        embed = server_embedder(client, model, retrying)
        if args.command == "index":
            return run_index(args, idx, embed, model, err)
        if args.command == "stats":
            for key, value in (("db", args.db), ("files", idx.count("files")), ("chunks", idx.count("chunks")),
                               ("model", idx.meta("model") or "-"), ("dimension", idx.meta("dimension") or "-")):
                print(f"{key:<10} {value}")
            return 0
        hits = idx.search(args.question, embed, args.k)
        if args.command == "search" or args.no_answer:
            show_hits(hits)
            return 0
        return run_ask(args, hits, client, retrying, model)
    except openai.APIError as e:
        err.print(f"[red]error:[/red] {escape(explain(e, base_url))}")
        return 1
    except RagError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}")
        return e.code
    except apsw.Error as e:
        err.print(f"[red]error:[/red] cannot use the index {escape(str(args.db))}: {escape(str(e))}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
