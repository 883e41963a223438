"""Reference outputs of the vision teachers, computed by onnxruntime (the test fixtures of
whittle's own forward passes).

    python tools/vision_fixture.py dinov2 PATH/vit_s_focus.onnx OUT.json
    python tools/vision_fixture.py open_nsfw PATH/open_nsfw.onnx OUT.json
    python tools/vision_fixture.py effnet_lite0 PATH/efficientnet-lite0-57934424.pth OUT.json

EfficientNet-Lite0 ships as a legacy PyTorch pickle, not ONNX: its reference is an independent
forward in numpy (float64) reading the pickle without torch.

The input image is a formula (both sides compute it in f64 and round to f32), so the fixture
stores only outputs: a few whole token rows of the backbone's last hidden state (after its
final LayerNorm) and the sums of the whole tensor. Needs: onnx, onnxruntime, numpy.
"""
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort


def formula_image(channels, height, width):
    """x[c, h, w] = 2 sin(0.05 (h + 1)(c + 1) + 0.03 w) - 0.5 cos(0.11 w h / 7 + c)."""
    c, h, w = np.meshgrid(
        np.arange(channels, dtype=np.float64),
        np.arange(height, dtype=np.float64),
        np.arange(width, dtype=np.float64),
        indexing="ij",
    )
    x = 2.0 * np.sin(0.05 * (h + 1.0) * (c + 1.0) + 0.03 * w) - 0.5 * np.cos(0.11 * w * h / 7.0 + c)
    return x.astype(np.float32)


def run_with_output(path, output, feeds):
    model = onnx.load(path)
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(output))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return session.run([output], feeds)[0]


def dinov2(path, out):
    size = 224
    image = formula_image(3, size, size)[None]
    hidden = run_with_output(path, "/backbone/layernorm/Add_1_output_0", {"input_image": image})[0]
    rows = [0, 1, 17, 128, hidden.shape[0] - 1]
    fixture = {
        "teacher": "dinov2",
        "image_size": size,
        "shape": list(hidden.shape),
        "rows": {str(r): hidden[r].astype(float).tolist() for r in rows},
        "sum": float(hidden.astype(np.float64).sum()),
        "abs_sum": float(np.abs(hidden.astype(np.float64)).sum()),
        "onnxruntime": ort.__version__,
    }
    with open(out, "w") as f:
        json.dump(fixture, f)


def open_nsfw(path, out):
    """ResNet-50-thin of Yahoo's Open-NSFW: NHWC BGR input minus the VGG means (a pixel scale, so
    the formula is multiplied by 50); the pooled 1024-d feature and the two-class softmax."""
    size = 224
    image = (50.0 * formula_image(3, size, size)).transpose(1, 2, 0)[None].copy()
    pooled = run_with_output(path, "/ReduceMean_output_0", {"input_0": image})[0]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    probs = session.run(None, {"input_0": image})[0][0]
    fixture = {
        "teacher": "open_nsfw",
        "image_size": size,
        "input_scale": 50.0,
        "pooled": pooled.astype(float).tolist(),
        "probabilities": probs.astype(float).tolist(),
        "onnxruntime": ort.__version__,
    }
    with open(out, "w") as f:
        json.dump(fixture, f)


def legacy_state_dict(path):
    """The float tensors of a legacy (non-zip) torch.save file, with numpy and pickle alone."""
    import collections
    import pickle

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return lambda storage, offset, size, stride, *rest: (storage, offset, size, stride)
            return name  # a storage class: its name is all that is needed

        def persistent_load(self, pid):
            return pid  # ("storage", class, key, location, size, view)

    with open(path, "rb") as f:
        for _ in range(3):
            Unpickler(f).load()
        state = Unpickler(f).load()
        keys = Unpickler(f).load()
        width = {"FloatStorage": 4, "LongStorage": 8}
        classes = {pid[2]: pid[1] for pid, *_ in state.values()}
        data = {}
        for key in keys:
            count = int(np.frombuffer(f.read(8), "<i8")[0])
            raw = f.read(count * width[classes[key]])
            if classes[key] == "FloatStorage":
                data[key] = np.frombuffer(raw, "<f4")
    out = {}
    for name, (pid, offset, size, stride) in state.items():
        if pid[2] in data:
            base = data[pid[2]]
            out[name] = np.lib.stride_tricks.as_strided(
                base[offset:], shape=size, strides=[4 * s for s in stride]).copy()
    return out


def same_pad(x, k, stride):
    """TensorFlow 'SAME' padding of an NCHW array (the extra row/column at the bottom/right)."""
    h, w = x.shape[2:]
    pads = []
    for n in (h, w):
        total = max((-(-n // stride) - 1) * stride + k - n, 0)
        pads.append((total // 2, total - total // 2))
    return np.pad(x, [(0, 0), (0, 0), pads[0], pads[1]])


def conv(x, w, stride, groups=1):
    """Direct convolution (cross-correlation) with SAME padding, by kernel offsets."""
    k = w.shape[2]
    x = same_pad(x, k, stride)
    n, c, h, wd = x.shape
    oh, ow = (h - k) // stride + 1, (wd - k) // stride + 1
    out = np.zeros((n, w.shape[0], oh, ow), np.float64)
    cin = c // groups
    cout = w.shape[0] // groups
    for g in range(groups):
        xs = x[:, g * cin:(g + 1) * cin]
        ws = w[g * cout:(g + 1) * cout]
        for i in range(k):
            for j in range(k):
                patch = xs[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
                out[:, g * cout:(g + 1) * cout] += np.einsum("nchw,oc->nohw", patch, ws[:, :, i, j])
    return out


def bn(x, sd, name):
    g, b = sd[name + ".weight"], sd[name + ".bias"]
    m, v = sd[name + ".running_mean"], sd[name + ".running_var"]
    scale = g / np.sqrt(v + 1e-3)
    return x * scale[None, :, None, None] + (b - m * scale)[None, :, None, None]


def relu6(x):
    return np.clip(x, 0.0, 6.0)


def effnet_lite0(path, out):
    """EfficientNet-Lite0 (MBConv without squeeze-excite, ReLU6, TF SAME padding, BN eps 1e-3)
    written in numpy from the legacy state dict: pooled 1280-d feature and logits."""
    sd = {k: v.astype(np.float64) for k, v in legacy_state_dict(path).items()}
    size = 224
    x = formula_image(3, size, size)[None].astype(np.float64)
    x = relu6(bn(conv(x, sd["_conv_stem.weight"], 2), sd, "_bn0"))
    strides = {1: 2, 3: 2, 5: 2, 11: 2}
    for i in range(16):
        p = f"_blocks.{i}."
        inp = x
        if p + "_expand_conv.weight" in sd:
            x = relu6(bn(conv(x, sd[p + "_expand_conv.weight"], 1), sd, p + "_bn0"))
        dw = sd[p + "_depthwise_conv.weight"]
        x = relu6(bn(conv(x, dw, strides.get(i, 1), groups=dw.shape[0]), sd, p + "_bn1"))
        x = bn(conv(x, sd[p + "_project_conv.weight"], 1), sd, p + "_bn2")
        if x.shape == inp.shape:
            x = x + inp
    x = relu6(bn(conv(x, sd["_conv_head.weight"], 1), sd, "_bn1"))
    pooled = x.mean(axis=(2, 3))[0]
    logits = pooled @ sd["_fc.weight"].T + sd["_fc.bias"]
    with open(out, "w") as f:
        json.dump({"teacher": "effnet_lite0", "image_size": size, "pooled": pooled.tolist(),
                   "logits": logits.tolist(), "reference": "numpy float64 (tools/vision_fixture.py)"}, f)


if __name__ == "__main__":
    teacher, path, out = sys.argv[1:4]
    {"dinov2": dinov2, "open_nsfw": open_nsfw, "effnet_lite0": effnet_lite0}[teacher](path, out)
