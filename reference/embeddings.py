"""Textual-inversion embeddings (runtime/embeddings.py) in the torch reference: the text encoders' token tables grown
by the rows the runtime computes, so export bakes them (build_engines.py --embedding) and the torch backend runs the
network the artifacts hold (baked rows from manifest.source["embeddings"], run-time rows from Pipeline.load)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ldm_rt.runtime.embeddings import Embedding, EmbeddingError, TokenRows, grown_table, prepare, read_embedding
from ldm_rt.runtime.embeddings import records as embedding_records

from .model_folder import LoadedModel

ENCODERS = ("text_encoder", "text_encoder_2")


def token_tables(model: Any) -> dict[str, torch.nn.Embedding]:
    """Each text encoder's token-embedding table (V, D), by component name."""
    return {n: getattr(model, n).text_model.embeddings.token_embedding for n in ENCODERS if getattr(model, n, None) is not None}


def grow_token_tables(model: Any, rows: Mapping[str, TokenRows]) -> None:
    """Put `rows` (text encoder -> TokenRows) into the encoders' token tables, grown as needed (grown_table, the
    runtime's arithmetic), in each table's dtype and device."""
    tables = token_tables(model)
    with torch.no_grad():
        for name, row in rows.items():
            table = tables[name]
            grown = grown_table(table.weight.detach().cpu().float().numpy(), row)
            weight = torch.from_numpy(grown).to(table.weight.dtype).to(table.weight.device)
            table.weight = torch.nn.Parameter(weight, requires_grad=False)
            table.num_embeddings = weight.shape[0]


def bake_embeddings(loaded: LoadedModel, files: Sequence[Embedding]) -> list[dict[str, Any]]:
    """Textual-inversion embeddings baked in (build_engines.py --embedding): each tokenizer learns their trigger words
    (its tokenizer.json carries them, for every runtime) and each text encoder's token table their vectors, as the
    runtime does when it opens a folder (runtime/embeddings.prepare, grown_table). Returns the manifest's records."""
    model = loaded.model
    tokenizers = {"text_encoder": loaded.tokenizer, "text_encoder_2": loaded.tokenizer_2}
    tables = token_tables(model)
    present = {n: t for n, t in tokenizers.items() if t is not None and n in tables}
    if not present:
        raise EmbeddingError("the model has no text encoder: textual-inversion embeddings need a text-conditioned model")
    grown, rows = prepare(files, present, {n: tables[n].embedding_dim for n in present})
    grow_token_tables(model, rows)
    loaded.tokenizer, loaded.tokenizer_2 = grown.get("text_encoder", loaded.tokenizer), grown.get("text_encoder_2", loaded.tokenizer_2)
    # The path too, as LoRA records have it, for a backend that rebuilds the weights from the source (torch_backend).
    return [{**r, "path": str(f.path.resolve())} for r, f in zip(embedding_records(files), files)]


def read_baked(root: Path, records: Sequence[Any]) -> list[Embedding]:
    """The embeddings an export baked into `root` (manifest.source["embeddings"]), read again from their files (the
    recorded trigger; sha256 checked), in export order; one line naming the file and the fix when one is gone or changed."""
    out = []
    for record in records:
        if not isinstance(record, dict) or not isinstance(record.get("path"), str) or not isinstance(record.get("token"), str):
            raise EmbeddingError(f"{root / 'manifest.json'}: an embedding record lacks its path or token; rebuild the artifacts")
        path = Path(record["path"]) if Path(record["path"]).is_absolute() else root / record["path"]
        if not path.is_file():
            raise EmbeddingError(
                f"the embedding {path} baked into {root} is not there any more; the torch backend needs it to rebuild the text "
                "encoders (put it back, or use --backend onnxruntime to run the exported graphs)"
            )
        embedding = read_embedding(path, record["token"])
        if embedding.sha256 != record.get("sha256"):
            raise EmbeddingError(f"the embedding {path} baked into {root} has changed since the export; put the original back or rebuild the artifacts")
        out.append(embedding)
    return out
