"""A decode-step graph for a bundle: its own ``model.onnx`` with each layer's attention replaced
by ONNX Runtime's ``GroupQueryAttention`` over a K/V buffer that past and present share.

Why: the exported graph takes the past as an input and returns ``present = Concat(past, new)``,
so every decode step copies each layer's whole past once in the graph, and its attention is
~35 small nodes per layer (RoPE as Slice/Neg/Concat, the causal mask, repeat-kv, softmax), which
at one token per row cost as much as the weights do. ``GroupQueryAttention`` (com.microsoft,
CPU kernel) applies RoPE from cos/sin tables, writes the new key and value of row b at column
``seqlens_k[b]`` of the buffer it is given, and attends over columns ``[0, seqlens_k[b]]``;
when the ``present`` output is bound to the ``past`` input's memory (IOBinding), nothing else
is copied. Rows must hold their keys packed from column 0 with position = column (the host
packs them, ``runtime/onnx_backend.py``).

How: the rewrite works on the graph's structure, not on names. Per layer, ``present.{i}.value``
is ``Concat(past, Transpose(Reshape(v)))`` and ``present.{i}.key`` is the same over RoPE of k;
the attention's two MatMuls read them, the scores' other operand leads back to q, and the
probabilities times V lead through Transpose/Reshape to the output projection's input. Those
tensors become one ``GroupQueryAttention`` node; every node then unused is dropped with the
attention mask and position ids. The cos/sin tables are the graph's own rotary subgraph run over
positions ``0..max_position_embeddings-1``, so any RoPE scaling the exporter traced is kept.
A graph that does not have this shape (GPT-2's learned positions, partial rotary, a changed
attention scale) raises ``DecodeGraphError`` and decode stays on the bundle's graph.

Weights are not copied: the rewritten graph references the bundle's external data files, and
``DecodeGraph.open`` checks one decode step against the bundle's graph on random rows of
different lengths (``DECODE_GRAPH`` in the tolerance table) before it is used.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from softprompt.tolerances import DECODE_GRAPH

if TYPE_CHECKING:
    import onnx
    import onnxruntime as ort

    from .bundle import Bundle

SEQLENS = "seqlens_k"  # [B] int32: keys each row holds before this step (its new key's column)
TOTAL = "total_sequence_length"  # [] int32: max over rows of seqlens_k + 1
COS, SIN = "gqa_cos_cache", "gqa_sin_cache"  # [max_positions, head_dim / 2] float32
_ROPE_OPS = {"Mul", "Add", "Sub", "Concat", "Neg", "Slice", "Split"}
_VIEW_OPS = {"Transpose", "Reshape", "Expand", "Unsqueeze", "Squeeze"}


class DecodeGraphError(ValueError):
    """The bundle's graph cannot be rewritten (or the rewrite differs from it)."""


@dataclass
class _Layer:
    q: str
    k: str
    v: str
    out: str  # the attention output, the output projection's input [B, S, H * D]
    removed: list  # the nodes the GroupQueryAttention node replaces (its outputs' producers)


def _maps(graph) -> tuple[dict, dict]:
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producer, consumers


def _projection(start: str, producer: dict, limit: int = 24) -> tuple[str, str]:
    """From a head-split tensor back to the projection it came from: the nearest
    ``Transpose(Reshape(x))`` above ``start`` (breadth first) through RoPE's element-wise ops
    and views. Returns (x, the Transpose's output)."""
    seen, todo = set(), deque([start])
    while todo and len(seen) < limit:
        t = todo.popleft()
        n = producer.get(t)
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        if n.op_type == "Transpose":
            r = producer.get(n.input[0])
            if r is not None and r.op_type == "Reshape":
                return r.input[0], n.output[0]
            continue
        if n.op_type in _ROPE_OPS or n.op_type in _VIEW_OPS:
            todo.extend(i for i in n.input if i)
    raise DecodeGraphError(f"no Transpose(Reshape(projection)) above {start!r}")


def _reader(tensor: str, consumers: dict) -> tuple:
    """The MatMul reading ``tensor`` through view ops (repeat-kv, K^T) and a scaling Mul;
    (node, the input it reads it on)."""
    todo = deque([tensor])
    while todo:
        t = todo.popleft()
        for n in consumers.get(t, []):
            if n.op_type == "MatMul":
                return n, t
            if n.op_type in _VIEW_OPS or n.op_type == "Mul":
                todo.append(n.output[0])
    raise DecodeGraphError(f"no MatMul reads {tensor!r}")


def _find_layer(i: int, producer: dict, consumers: dict) -> tuple[_Layer, str, str]:
    """Layer ``i``'s attention tensors; also its key RoPE's two table operands (cos, sin
    candidates, in no particular order)."""
    ck, cv = producer.get(f"present.{i}.key"), producer.get(f"present.{i}.value")
    for c, name in ((ck, "key"), (cv, "value")):
        if c is None or c.op_type != "Concat" or list(c.input[:1]) != [f"past_key_values.{i}.{name}"] \
                or len(c.input) != 2:
            raise DecodeGraphError(f"present.{i}.{name} is not Concat(past, new)")
    vt = producer.get(cv.input[1])
    vr = producer.get(vt.input[0]) if vt is not None and vt.op_type == "Transpose" else None
    if vr is None or vr.op_type != "Reshape":
        raise DecodeGraphError(f"layer {i}: the new value is not Transpose(Reshape(v))")
    v = vr.input[0]
    k, k_heads = _projection(ck.input[1], producer)
    scores, via = _reader(ck.output[0], consumers)
    q, _ = _projection(scores.input[0] if via == scores.input[1] else scores.input[1], producer)
    pv, _ = _reader(cv.output[0], consumers)
    out, node = pv.output[0], pv
    while True:  # probabilities @ V, then back to [B, S, H * D] through views
        nxt = consumers.get(out, [])
        if len(nxt) != 1 or nxt[0].op_type not in ("Transpose", "Reshape"):
            break
        node = nxt[0]
        out = node.output[0]
    if node is pv:
        raise DecodeGraphError(f"layer {i}: no Transpose/Reshape after the attention's P @ V")
    # the key's RoPE: Add(Mul(k_heads, cos), Mul(rotate_half(k_heads), sin))
    tables = []
    for n in consumers.get(k_heads, []):
        if n.op_type == "Mul":
            tables.append(n.input[1] if n.input[0] == k_heads else n.input[0])
    rope_add = producer.get(ck.input[1])
    if rope_add is None or rope_add.op_type != "Add" or len(tables) != 1:
        raise DecodeGraphError(f"layer {i}: the key is not RoPE'd as x * cos + rotate_half(x) * sin")
    other = [producer.get(t) for t in rope_add.input]
    sin = [m.input[1 - j] for m in other if m is not None and m.op_type == "Mul"
           for j in (0, 1) if producer.get(m.input[j]) is not None
           and producer[m.input[j]].op_type in ("Concat",)]
    if len(sin) != 1:
        raise DecodeGraphError(f"layer {i}: rotate_half(k) * sin not found")
    return _Layer(q, k, v, out, [ck, cv, node]), tables[0], sin[0]


def _constant(name: str, inits: dict, producer: dict) -> np.ndarray | None:
    """The value of an inline initializer or Constant node (None for anything else)."""
    from onnx import numpy_helper

    t = inits.get(name)
    if t is not None and not t.external_data:
        return numpy_helper.to_array(t)
    n = producer.get(name)
    if n is not None and n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
        return numpy_helper.to_array(n.attribute[0].t)
    return None


def fuse_rms_norms(graph) -> int:
    """Each RMSNorm as traced from transformers, ``w * (x * Reciprocal(Sqrt(ReduceMean(Pow(x, 2),
    -1) + eps)))`` (7 nodes), becomes ONNX Runtime's ``SimplifiedLayerNormalization(x, w)``
    (float32 statistics); the replaced nodes are left for pruning. Returns how many."""
    from onnx import helper

    producer, consumers = _maps(graph)
    inits = {t.name: t for t in graph.initializer}
    new = {}
    for r in graph.node:
        p = producer.get(r.input[0]) if r.op_type == "ReduceMean" else None
        if p is None or p.op_type != "Pow":
            continue
        two = _constant(p.input[1], inits, producer)
        axes = _constant(r.input[1], inits, producer) if len(r.input) > 1 else None
        if two is None or two.size != 1 or float(two) != 2 or axes is None or axes.tolist() not in ([-1], [2]):
            continue
        x, chain, t = p.input[0], [], r.output[0]
        for op in ("Add", "Sqrt", "Reciprocal", "Mul", "Mul"):
            c = consumers.get(t, [])
            if len(c) != 1 or c[0].op_type != op:
                break
            chain.append(c[0])
            t = c[0].output[0]
        if len(chain) != 5:
            continue
        add, mul_x, mul_w = chain[0], chain[3], chain[4]
        eps = _constant(add.input[1] if add.input[0] == r.output[0] else add.input[0], inits, producer)
        if eps is None or eps.size != 1 or x not in mul_x.input:
            continue
        w = mul_w.input[1] if mul_w.input[0] == mul_x.output[0] else mul_w.input[0]
        new[id(mul_w)] = helper.make_node("SimplifiedLayerNormalization", [x, w], [mul_w.output[0]],
                                           name=f"{mul_w.name}_rms", axis=-1, epsilon=float(eps),
                                           stash_type=1)
    nodes = [new.get(id(n), n) for n in graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    return len(new)


def fuse_projections(graph, folder: str) -> dict[str, np.ndarray]:
    """Sibling projections of one input (q/k/v, gate/up) as one: a MatMul over their float32
    weights side by side, or one MatMulNBits over their 4-bit blocks side by side (with its
    block minimums' MatMul and Add, ``export/quantize.py``), then a Split into the original
    outputs; the same products, fewer and larger calls. The joined weights (read from ``folder``)
    are not put in the graph: it declares them as external data, and the returned
    ``{name: array}`` is handed to the session (``add_external_initializers``)."""
    from onnx import helper, numpy_helper

    producer, consumers = _maps(graph)
    inits = {t.name: t for t in graph.initializer}
    groups: dict[tuple, list] = {}
    for n in graph.node:
        if n.op_type == "MatMulNBits" and len(n.input) == 4 and all(i in inits for i in n.input[1:]):
            add = consumers.get(n.output[0], [])
            if len(add) != 1 or add[0].op_type != "Add":
                continue
            term = producer.get(add[0].input[1] if add[0].input[0] == n.output[0] else add[0].input[0])
            if term is None or term.op_type != "MatMul" or term.input[1] not in inits:
                continue
            attrs = tuple(sorted((a.name, a.i) for a in n.attribute if a.name != "N"))
            groups.setdefault(("MatMulNBits", n.input[0], term.input[0], attrs), []).append((n, term, add[0]))
    terms = {id(m[1]) for ms in groups.values() for m in ms}  # the minimums' MatMuls: joined above
    for n in graph.node:
        if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2 \
                and id(n) not in terms:
            groups.setdefault(("MatMul", n.input[0]), []).append((n,))

    def arr(name):
        return numpy_helper.to_array(inits[name], base_dir=folder)

    fused, new_inits, held = {}, [], {}
    for key, members in groups.items():
        if len(members) < 2:
            continue
        tag = members[0][0].name or f"projection_{len(fused)}"
        if key[0] == "MatMul":
            ws = [arr(m[0].input[1]) for m in members]
            sizes = [w.shape[1] for w in ws]
            joined = [np.concatenate(ws, 1)]
            nodes = [helper.make_node("MatMul", [key[1], f"{tag}_joined_w"], [f"{tag}_joined"],
                                      name=f"{tag}_joined")]
            names = [f"{tag}_joined_w"]
        else:
            nb, term = members[0][0], members[0][1]
            parts = [[arr(m[0].input[i]) for m in members] for i in (1, 2, 3)]
            mins = np.concatenate([arr(m[1].input[1]) for m in members], 1)
            sizes = [int(p.shape[0]) for p in parts[0]]
            joined = [np.concatenate(p, 0) for p in parts] + [mins]
            names = [f"{tag}_joined_{x}" for x in ("codes", "scales", "zp", "mins")]
            attrs = {a.name: a.i for a in nb.attribute}
            attrs["N"] = sum(sizes)
            nodes = [helper.make_node("MatMulNBits", [key[1], *names[:3]], [f"{tag}_joined_dq"],
                                      name=f"{tag}_joined", domain="com.microsoft", **attrs),
                     helper.make_node("MatMul", [term.input[0], names[3]], [f"{tag}_joined_mt"],
                                      name=f"{tag}_joined_mins"),
                     helper.make_node("Add", [f"{tag}_joined_dq", f"{tag}_joined_mt"], [f"{tag}_joined"],
                                      name=f"{tag}_joined_add")]
        for j, nm in zip(joined, names):
            held[nm] = np.ascontiguousarray(j)
            new_inits.append(_declared(nm, held[nm]))
        new_inits.append(numpy_helper.from_array(np.array(sizes, np.int64), f"{tag}_joined_split"))
        nodes.append(helper.make_node("Split", [f"{tag}_joined", f"{tag}_joined_split"],
                                      [m[-1].output[0] for m in members], name=f"{tag}_split", axis=-1))
        fused[id(members[0][0])] = nodes
        for m in members[1:]:
            fused.update({id(n): [] for n in m})
        for n in members[0][1:]:
            fused[id(n)] = []
    out = [x for n in graph.node for x in fused.get(id(n), [n])]
    del graph.node[:]
    graph.node.extend(out)
    graph.initializer.extend(new_inits)
    return held


def _declared(name: str, a: np.ndarray):
    """An initializer of ``a``'s type and shape whose data the session is given in memory."""
    import onnx
    from onnx import helper

    t = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(a.dtype), dims=a.shape,
                         data_location=onnx.TensorProto.EXTERNAL)
    t.external_data.add(key="location", value="in-memory")
    return t


def toposort(graph) -> None:
    """Reorder ``graph.node`` so every node follows the producers of its inputs (stable)."""
    producer, consumers = _maps(graph)  # a node reading a tensor twice is listed twice
    waiting = {id(n): sum(1 for i in n.input if i in producer) for n in graph.node}
    order, ready = [], deque(n for n in graph.node if waiting[id(n)] == 0)
    while ready:
        n = ready.popleft()
        order.append(n)
        for o in n.output:
            for c in consumers.get(o, []):
                waiting[id(c)] -= 1
                if waiting[id(c)] == 0:
                    ready.append(c)
    if len(order) != len(graph.node):
        raise DecodeGraphError("the rewritten graph has a cycle")
    del graph.node[:]
    graph.node.extend(order)


def _upstream(graph, outputs: list[str]) -> list:
    """The nodes ``outputs`` depend on, in graph order."""
    producer, _ = _maps(graph)
    need, todo = set(), list(outputs)
    while todo:
        n = producer.get(todo.pop())
        if n is not None and id(n) not in need:  # by identity: exporters leave some names empty
            need.add(id(n))
            todo.extend(i for i in n.input if i)
    return [n for n in graph.node if id(n) in need]


def rotary_tables(model: onnx.ModelProto, cos: str, sin: str, positions: int,
                  folder: str) -> tuple[np.ndarray, np.ndarray]:
    """The graph's own rotary tables ``cos``/``sin`` ``[1, positions, D]`` (HF's
    ``cat(freqs, freqs)`` layout), computed by its subgraph from ``position_ids``; returned as
    ``[positions, D / 2]`` float32 (GroupQueryAttention's layout)."""
    import onnx
    from onnx import helper

    g = model.graph
    nodes = _upstream(g, [cos, sin])
    used = {i for n in nodes for i in n.input}
    inputs = [i for i in g.input if i.name in used]
    if [i.name for i in inputs] != ["position_ids"]:
        raise DecodeGraphError(f"the rotary tables depend on {[i.name for i in inputs]}, "
                               "expected position_ids only")
    sub = helper.make_graph(nodes, "rotary", inputs,
                            [helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                             for t in (cos, sin)],
                            [t for t in g.initializer if t.name in used])
    m = helper.make_model(sub, opset_imports=model.opset_import, ir_version=model.ir_version)
    c, s = _session(m, folder).run(None, {"position_ids": np.arange(positions)[None]})
    c, s = np.asarray(c, np.float32).reshape(positions, -1), np.asarray(s, np.float32).reshape(positions, -1)
    if abs(float(c[0, 0]) - 1) > 1e-6:  # cos(0) = 1: the two operands were in the other order
        c, s = s, c
    half = c.shape[1] // 2
    if not (np.array_equal(c[:, :half], c[:, half:]) and np.array_equal(s[:, :half], s[:, half:])):
        raise DecodeGraphError("the rotary tables are not cat(freqs, freqs) (interleaved RoPE)")
    return np.ascontiguousarray(c[:, :half]), np.ascontiguousarray(s[:, :half])


def _session(model: onnx.ModelProto, folder: str, options: ort.SessionOptions | None = None,
             held: dict[str, np.ndarray] | None = None):
    """An ORT CPU session over an in-memory graph whose external weights lie in ``folder``, or
    in ``held`` (arrays the caller keeps alive as long as the session)."""
    import onnxruntime as ort

    from .bundle import session_defaults

    so = options or session_defaults()
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
    if held:
        so.add_external_initializers(list(held), [ort.OrtValue.ortvalue_from_numpy(a) for a in held.values()])
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def rewrite(model: onnx.ModelProto, num_heads: int, num_kv_heads: int, head_dim: int,
            num_layers: int, max_positions: int, folder: str) -> tuple[onnx.ModelProto, dict]:
    """The decode graph of ``model`` (loaded without its external data, which stays in
    ``folder``). Inputs: ``inputs_embeds [B, 1, E]``, ``seqlens_k [B]`` int32,
    ``total_sequence_length []`` int32, ``past_key_values.{i}.key/value [B, Hkv, M, D]``
    (M: the buffer's capacity, > every seqlens_k), ``logits_index [B, K]``; outputs ``logits``
    and ``present.{i}.key/value``, to be bound to the past buffers (IOBinding). Also returns the
    joined projection weights the graph declares (``fuse_projections``), for the session."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())  # the caller's stays as it is
    g = model.graph
    producer, consumers = _maps(g)
    layers, tables = [], None
    for i in range(num_layers):
        layer, a, b = _find_layer(i, producer, consumers)
        layers.append(layer)
        tables = tables or (a, b)
    cos, sin = rotary_tables(model, tables[0], tables[1], max_positions, folder)
    if cos.shape[1] * 2 != head_dim:
        raise DecodeGraphError(f"rotary dimension {cos.shape[1] * 2} != head_dim {head_dim} "
                               "(partial rotary)")
    drop = {id(n) for layer in layers for n in layer.removed}
    nodes = []
    at = {id(layer.removed[-1]): (i, layer) for i, layer in enumerate(layers)}
    for n in g.node:
        if id(n) in at:
            i, layer = at[id(n)]
            nodes.append(helper.make_node(
                "GroupQueryAttention",
                [layer.q, layer.k, layer.v, f"past_key_values.{i}.key", f"past_key_values.{i}.value",
                 SEQLENS, TOTAL, COS, SIN],
                [layer.out, f"present.{i}.key", f"present.{i}.value"], name=f"gqa_{i}",
                domain="com.microsoft", num_heads=num_heads, kv_num_heads=num_kv_heads,
                do_rotary=1, rotary_interleaved=0))
        elif id(n) not in drop:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    fuse_rms_norms(g)
    live = _upstream(g, [o.name for o in g.output])
    del g.node[:]
    g.node.extend(live)
    held = fuse_projections(g, folder)
    toposort(g)
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep + [numpy_helper.from_array(cos, COS), numpy_helper.from_array(sin, SIN)])
    inputs = [i for i in g.input if i.name in used]
    del g.input[:]
    g.input.extend(inputs[:1] + [helper.make_tensor_value_info(SEQLENS, onnx.TensorProto.INT32, ["batch"]),
                                 helper.make_tensor_value_info(TOTAL, onnx.TensorProto.INT32, [])]
                   + inputs[1:])
    for o in g.output[1:]:  # presents: the buffer's capacity, not past + 1
        o.type.tensor_type.shape.dim[2].dim_param = "capacity"
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model, held


class DecodeGraph:
    """One decode step on packed K/V buffers, in place (see the module docstring).

    bundle: the bundle whose graph was rewritten (its weights, embeddings, manifest);
    session: ONNX Runtime's session over the rewritten graph.
    """

    packed = True
    storage = "float32"

    def __init__(self, bundle: Bundle, session: ort.InferenceSession):
        self.bundle, self.session = bundle, session
        self.manifest, self.compute_dtype = bundle.manifest, bundle.compute_dtype
        self.np_dtype, self.embeddings = bundle.np_dtype, bundle.embeddings
        self.path = bundle.path

    @classmethod
    def open(cls, bundle: Bundle, options: ort.SessionOptions | None = None,
             check: bool = True) -> DecodeGraph:
        """Rewrite ``bundle``'s graph (CPU, float32 I/O) and, with ``check``, compare one decode
        step with the bundle's graph on 3 random rows of different past lengths (``check``).

        Raises:
            DecodeGraphError: the graph has another shape, or the step differs by more than
                ``DECODE_GRAPH`` (log-probs).
        """
        import onnx

        from .bundle import MODEL_FILE

        if bundle.np_dtype != np.float32 or bundle.session.get_providers()[0] != "CPUExecutionProvider":
            raise DecodeGraphError("the decode graph is built for float32 bundles under ONNX "
                                   "Runtime's CPU provider")
        b = bundle
        model = onnx.load(str(b.path / MODEL_FILE), load_external_data=False)
        fused, held = rewrite(model, b.num_heads, b.num_kv_heads, b.head_dim, b.num_layers,
                        int(b.max_position_embeddings or 4096), str(b.path))
        graph = cls(b, _session(fused, str(b.path), options, held))
        graph.held = held  # the session reads these arrays
        if check:
            graph.check()
        return graph

    def run(self, inputs_embeds: np.ndarray, seqlens: np.ndarray, past: list) -> np.ndarray:
        """One token per row: ``inputs_embeds [B, 1, E]``; ``seqlens [B]`` keys row b holds
        (packed from column 0; its new token's position and column); ``past``: per layer
        ``(K, V)`` C-contiguous float32 ``[B, Hkv, M, D]`` with M > max(seqlens), written in
        place at column ``seqlens[b]``. Returns logits ``[B, V]`` float32."""
        import onnxruntime as ort

        B = len(seqlens)
        binding = self.session.io_binding()
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(inputs_embeds, np.float32))
        binding.bind_cpu_input(SEQLENS, np.ascontiguousarray(seqlens, np.int32))
        binding.bind_cpu_input(TOTAL, np.array(int(seqlens.max()) + 1, np.int32))
        binding.bind_cpu_input("logits_index", np.zeros((B, 1), np.int64))
        binding.bind_output("logits")  # first: get_outputs() follows the binding order
        for i, (k, v) in enumerate(past):
            for name, a in ((f"{i}.key", k), (f"{i}.value", v)):
                buf = ort.OrtValue.ortvalue_from_numpy(a)  # shares a's memory
                binding.bind_ortvalue_input(f"past_key_values.{name}", buf)
                binding.bind_ortvalue_output(f"present.{name}", buf)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()[:, 0]

    def check(self, lengths: tuple[int, ...] = (5, 17, 1), capacity: int = 24) -> float:
        """``check_in_place`` of this graph."""
        return check_in_place(self, lengths, capacity)


class InPlaceDecoder(Protocol):
    """What a packed decode state steps on (``DecodeGraph``; ``OpenVinoDecoder`` in
    ``export/ov_session.py``): ``run`` writes each row's new key and value into the buffers it
    is given, at the row's length. ``storage``: the buffers' dtype, ``"float32"`` or
    ``"bfloat16"`` (uint16 bit patterns)."""

    packed: bool
    storage: str
    bundle: Bundle
    path: Any
    compute_dtype: str
    embeddings: np.ndarray
    np_dtype: Any

    def run(self, inputs_embeds: np.ndarray, seqlens: np.ndarray, past: list) -> np.ndarray: ...


def check_in_place(decoder: InPlaceDecoder, lengths: tuple[int, ...] = (5, 17, 1),
                   capacity: int = 24, reference: Bundle | None = None) -> float:
    """Rows of random tokens (``lengths``, right-padded) through the decoder's bundle graph, then
    one more token each: on the bundle's graph (dense masked past; ``reference``: another
    session over it, default the decoder's bundle) and on ``decoder`` (the presents packed into
    ``capacity`` columns of its storage dtype). Returns the largest |delta log-prob|; raises
    ``DecodeGraphError`` above ``DECODE_GRAPH`` for the decoder's compute dtype (the tolerance
    table)."""
    from .ov_session import to_bfloat16_bits

    b = reference or decoder.bundle
    rng = np.random.default_rng(0)
    B, S = len(lengths), max(lengths)
    seqlens = np.array(lengths)
    ids = rng.integers(0, b.vocab_size, (B, S + 1))
    emb = b.embeddings[ids].astype(np.float32)
    mask = (np.arange(S)[None] < seqlens[:, None]).astype(np.int64)
    _, dense = b.run(emb[:, :S], mask, np.arange(S)[None].repeat(B, 0), b.empty_past(B),
                     np.zeros((B, 1), np.int64))
    new = emb[np.arange(B), seqlens][:, None]  # row b's next token sits at its own length
    mask = np.concatenate([mask, np.ones((B, 1), np.int64)], 1)
    want, _ = b.run(new, mask, seqlens[:, None], dense, np.zeros((B, 1), np.int64))
    bf16 = decoder.storage == "bfloat16"
    shape = (B, b.num_kv_heads, capacity, b.head_dim)
    dtype = np.uint16 if bf16 else np.float32
    past = [(np.zeros(shape, dtype), np.zeros(shape, dtype)) for _ in dense]
    for (k, v), (dk, dv) in zip(past, dense):
        k[:, :, :S], v[:, :, :S] = (to_bfloat16_bits(dk), to_bfloat16_bits(dv)) if bf16 else (dk, dv)
    got = decoder.run(new, seqlens, past)
    err = float(np.abs(_log_probs(got) - _log_probs(want[:, 0])).max())
    tol = DECODE_GRAPH[decoder.compute_dtype]["atol"]
    if not err <= tol:
        raise DecodeGraphError(f"{decoder.path}: the in-place decode step's log-probs differ from "
                               f"the bundle's graph by {err:.2e} (> {tol})")
    return err


def _log_probs(logits: np.ndarray) -> np.ndarray:
    """log-softmax over the last axis, in float64."""
    x = logits.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
