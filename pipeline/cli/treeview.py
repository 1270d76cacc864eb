"""Render one TreeRollout as a self-contained HTML page: nodes as nested segments with their text,
leaves coloured by reward (green positive, red negative), with the tree's accounting on top."""

from __future__ import annotations

import html
from collections.abc import Callable

from pipeline.wire.messages import TreeRollout

Decode = Callable[[list[int]], str]


def _color(reward: float) -> str:
    if reward > 0:
        return "#c8f7c5"
    if reward < 0:
        return "#f7c5c5"
    return "#eeeeee"


def render_html(tree: TreeRollout, decode: Decode | None = None) -> str:
    """The page for ``tree``; ``decode`` turns token ids into text (ids are shown without it)."""
    text: Decode = decode or (lambda ids: " ".join(map(str, ids)))
    children: dict[int, list[int]] = {}
    for i, node in enumerate(tree.nodes):
        children.setdefault(node.parent, []).append(i)
    leaf_of = {leaf.node: leaf for leaf in tree.leaves}

    def block(i: int) -> str:
        node = tree.nodes[i]
        leaf = leaf_of.get(i)
        style = f"background:{_color(leaf.reward)}" if leaf else "background:#f4f4ff"
        label = (
            f"<b>leaf</b> reward {leaf.reward:+g} ({html.escape(leaf.finish_reason)})"
            if leaf
            else f"node {i}"
        )
        kids = "".join(block(c) for c in children.get(i, []))
        return (
            f'<div class="node" style="{style}"><div class="meta">{label} · v{node.policy_version}'
            f" · {len(node.token_ids)} tok</div><code>{html.escape(text(node.token_ids.tolist()))}</code>"
            f"{kids}</div>"
        )

    s = tree.stats
    saving = 1 - s.decoded_tokens / s.independent_tokens if s.independent_tokens else 0.0
    head = (
        f"<h2>tree {html.escape(tree.tree_id)} · prompt {html.escape(tree.prompt_id)} · "
        f"sampler {html.escape(tree.sampler_id)}</h2><p>{len(tree.leaves)} leaves, "
        f"{len(tree.nodes)} segments; decoded {s.decoded_tokens} tokens vs {s.independent_tokens} "
        f"for independent sampling ({saving:.0%} saved); {s.engine_calls} engine calls, "
        f"{s.fallbacks} fallbacks, depth {s.max_depth_reached}</p>"
        f"<p>prompt: <code>{html.escape(text(tree.prompt_token_ids.tolist()))}</code></p>"
    )
    body = "".join(block(i) for i in children.get(-1, []))
    css = (
        "body{font-family:sans-serif;margin:1em} .node{border:1px solid #889;border-radius:4px;"
        "margin:4px 0 4px 18px;padding:3px 6px} .meta{font-size:11px;color:#446} "
        "code{white-space:pre-wrap}"
    )
    return f"<!doctype html><html><head><meta charset='utf-8'><style>{css}</style></head><body>{head}{body}</body></html>"
