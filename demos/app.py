"""The Gradio demo (``mmattn demo``): baseline beside an intervention, for generation and for VQA.

Generate: a diffusion model (the shipped shapes-t2i by default, or a tiny model), a prompt and a seed; the method and
its settings come from the method registry (one group of controls per method, from its config fields). VQA: the
shipped shapes-vlm answers a question about an uploaded image or a shapes-world scene drawn from a seed, without and
with a pruning method; the image comes back with the visual tokens the method pruned darkened.

Inputs are checked before any work (prompt and question length, steps, seed, image size) and refused with a message
naming the field and its range; the browser never names a file path; one job runs at a time (a queue).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import tempfile
from pathlib import Path

import torch

from mmattn import methods as registry

GENERATION_MODELS = ("mmattn/shapes-t2i", "tiny/sd3", "tiny/wan")
VQA_MODELS = ("mmattn/shapes-vlm",)
MAX_PROMPT, MAX_STEPS, MAX_IMAGE_SIDE, MAX_FRAMES = 200, 50, 1024, 17
GUIDANCE = [name for name in registry.list_methods("diffusion")
            if "scale" in {f.name for f in dataclasses.fields(registry.get(name))}]
PRUNING = ("fastv", "sparsevlm", "divprune", "visionzip")
VQA_METHODS = (*PRUNING, "var")  # pruning (the pruned tokens shown) and VAR (its visual sinks shown)
SELECTION = ("heads", "layers")


def controls_of(name: str) -> list[dataclasses.Field]:
    """The settings of method ``name`` the demo shows: every field with a plain default (number, bool, choice,
    text) or a head selection."""
    return [f for f in registry.settings(name)
            if f.name in SELECTION or isinstance(f.default, (bool, int, float, str))]


def check_text(field: str, text: str) -> str:
    text = (text or "").strip()
    if not text or len(text) > MAX_PROMPT:
        raise ValueError(f"{field} must have 1 to {MAX_PROMPT} characters; got {len(text)}")
    return text


def check_int(field: str, value, lowest: int, highest: int) -> int:
    if value is None or float(value) != int(value) or not lowest <= int(value) <= highest:
        raise ValueError(f"{field}={value!r} is out of range: expected an int in [{lowest}, {highest}]")
    return int(value)


def method_from(name: str, values: dict):
    """The config of method ``name`` from the controls' values (text fields left empty take the defaults)."""
    cls = registry.get(name)
    settings = {}
    for f in controls_of(name):
        value = values.get(f.name)
        if value is None or value == "":
            continue
        if isinstance(f.default, int) and not isinstance(f.default, bool) and float(value) == int(value):
            value = int(value)
        settings[f.name] = value
    return cls(**settings)


@functools.lru_cache(maxsize=2)
def generation_pipeline(model_id: str):
    from mmattn.pipelines.generation import GenerationPipeline

    return GenerationPipeline.from_pretrained(model_id)


@functools.lru_cache(maxsize=1)
def vqa_model(model_id: str):
    from mmattn import hub

    return hub.load_vlm(model_id)


def window_footprint(grid: tuple[int, int], kernel: int):
    """The token grid with what two queries see under ``Window2D(kernel)``: the centre token's window in blue, a
    corner token's (shifted inward, NATTEN's rule) in orange; the queries themselves darker."""
    from PIL import Image, ImageDraw

    from mmattn.windows import Window2D

    spec, (rows, cols) = Window2D(kernel), grid
    cell = max(8, 192 // max(rows, cols))
    picture = Image.new("RGB", (cols * cell, rows * cell), "white")
    draw = ImageDraw.Draw(picture)
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    for (qr, qc), colour, dark in (((rows // 2, cols // 2), (120, 160, 255), (30, 60, 200)),
                                   ((0, 0), (255, 190, 110), (220, 110, 0))):
        seen = spec.visible((torch.tensor(qr), torch.tensor(qc)), (r, c), grid)
        for i, j in seen.nonzero().tolist():
            draw.rectangle([j * cell, i * cell, (j + 1) * cell - 1, (i + 1) * cell - 1], fill=colour)
        draw.rectangle([qc * cell, qr * cell, (qc + 1) * cell - 1, (qr + 1) * cell - 1], fill=dark)
    for i in range(rows + 1):
        draw.line([0, i * cell, cols * cell, i * cell], fill=(200, 200, 200))
    for j in range(cols + 1):
        draw.line([j * cell, 0, j * cell, rows * cell], fill=(200, 200, 200))
    return picture


def generate(model_id: str, prompt: str, seed, steps, method_name: str, values: dict, window=0):
    """(baseline, intervened, what ran, window footprint or None): image paths (animated WebP for video models), a
    one-line summary, and with ``window`` > 0 (image models) the window a query sees."""
    if model_id not in GENERATION_MODELS:
        raise ValueError(f"model={model_id!r}: expected one of {', '.join(GENERATION_MODELS)}")
    prompt = check_text("prompt", prompt)
    seed = check_int("seed", seed, 0, 2 ** 31 - 1)
    steps = check_int("steps", steps, 1, MAX_STEPS)
    if method_name not in GUIDANCE:
        raise ValueError(f"method={method_name!r}: expected one of {', '.join(GUIDANCE)}")
    from mmattn.pipelines.generation import default_heads

    gen = generation_pipeline(model_id)
    selection = "layers" if "layers" in {f.name for f in controls_of(method_name)} else "heads"
    values = {**values, selection: values.get(selection) or default_heads(gen.pipe)}
    method = method_from(method_name, values)
    window = check_int("window", window or 0, 0, 64)
    gen.methods, gen.compare = [method], True
    footprint = None
    if window:
        from mmattn.windows import Window2D, WindowAttention

        if gen.video:
            raise ValueError("window: the demo's window attention is for image models; use mmattn video --window")
        gen.methods = [[method, WindowAttention(Window2D(window))]]
        factor = gen.pipe.vae_scale_factor * (getattr(gen.pipe.transformer.config, "patch_size", None) or 1)
        grid = (gen.call["height"] // factor, gen.call["width"] // factor)
        if window > min(grid):
            raise ValueError(f"window={window} is out of range for {model_id}: expected an int in [0, {min(grid)}] "
                             f"(its token grid is {grid[0]} x {grid[1]})")
        footprint = window_footprint(grid, window)
    call = dict(gen.call, num_inference_steps=steps)
    if gen.video:
        call["num_frames"] = min(call.get("num_frames", 5), MAX_FRAMES)
    gen.call = call
    try:
        run = gen.generate([prompt], seeds=[seed], out=Path(tempfile.mkdtemp(prefix="mmattn-demo-")), progress=False)
    finally:
        gen.methods = []
    files = {Path(record["file"]).parts[0]: record["file"] for record in run.settings["outputs"]}
    out = run.files[0].parents[1]
    label = f"{method.name}+window" if window else method.name
    summary = (f"{method_name} on {getattr(method, selection)}{f' + {window}x{window} window' if window else ''} · "
               f"{steps} steps · seed {seed} · {run.settings['seconds']} s")
    return str(out / files["baseline"]), str(out / files[label]), summary, footprint


def token_overlay(image, image_positions: list[int], marked: set[int], side: int, kind: str):
    """The image (resized to the model's square input) with the visual tokens at ``marked`` positions darkened
    (``kind="pruned"``) or outlined in red (``kind="sinks"``)."""
    from PIL import Image, ImageDraw

    size = 192
    picture = image.convert("RGB").resize((size, size), Image.NEAREST)
    shade = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(shade)
    cell = size / side
    for index, position in enumerate(image_positions):
        if position in marked:
            row, col = divmod(index, side)
            box = [col * cell, row * cell, (col + 1) * cell - 1, (row + 1) * cell - 1]
            if kind == "pruned":
                draw.rectangle(box, fill=(0, 0, 0, 170))
            else:
                draw.rectangle(box, outline=(255, 0, 0, 255), width=2)
    return Image.alpha_composite(picture.convert("RGBA"), shade).convert("RGB")


def answer(image, scene_seed, question: str, method_name: str, values: dict):
    """(baseline answer, answer with the method, the image with the pruned tokens darkened or VAR's visual sinks
    outlined, a summary)."""
    import mmattn
    from mmattn.processors import pruning, sinks
    from mmattn.shapes import scenes, vlm as shapes_vlm

    question = check_text("question", question)
    if image is None:
        scene = scenes.scene(check_int("scene seed", scene_seed, 0, 2 ** 31 - 1))
        image = scenes.render(scene, shapes_vlm.IMAGE_SIZE)
    elif max(image.size) > MAX_IMAGE_SIDE:
        raise ValueError(f"image is {image.width} x {image.height}: expected at most {MAX_IMAGE_SIDE} pixels a side")
    if method_name not in VQA_METHODS:
        raise ValueError(f"method={method_name!r}: expected one of {', '.join(VQA_METHODS)}")
    model, processor = vqa_model(VQA_MODELS[0])
    method = method_from(method_name, values)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(chat, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image.convert("RGB")], return_tensors="pt")

    def reply():
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    baseline = reply()
    image_positions = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1).tolist()
    side = math.isqrt(len(image_positions))
    with mmattn.apply(model, method):
        intervened = reply()
        if method_name == "var":
            with torch.no_grad():
                model(**inputs)  # the prefill alone: its sink statistics
            layers = sinks.last_sink_stats(model).layers
    if method_name == "var":
        marked = {int(p) for layer in layers if layer.visual_sink_keys is not None
                  for p in layer.visual_sink_keys[0].nonzero().squeeze(1).tolist()}
        overlay = token_overlay(image, image_positions, marked, side, "sinks")
        moved = sum(layer.mass_moved for layer in layers)
        summary = (f"var: {len(marked & set(image_positions))} visual sink tokens (outlined) · "
                   f"{sum(layer.rows for layer in layers)} (head, row)s redistributed · mass moved {moved:.2f}")
        return baseline, intervened, overlay, summary
    stats = pruning.last_stats(model)
    kept = stats.kept_image_positions[0]
    overlay = token_overlay(image, image_positions, set(image_positions) - set(kept.tolist()), side, "pruned")
    summary = (f"{method_name}: {len(kept)} of {len(image_positions)} visual tokens kept · "
               f"{stats.equivalent_tokens:.0f} equivalent tokens · prefill {stats.prefill_seconds * 1000:.0f} ms")
    return baseline, intervened, overlay, summary


def build():
    """The Gradio Blocks app (queued: one job at a time)."""
    import gradio as gr

    def field_control(f: dataclasses.Field, method: str):
        label = f"{method}: {f.name}"
        info = f.metadata.get("help")
        if f.metadata.get("choices"):
            return gr.Dropdown(list(f.metadata["choices"]), value=f.default, label=label, info=info)
        if isinstance(f.default, bool):
            return gr.Checkbox(value=f.default, label=label, info=info)
        if isinstance(f.default, (int, float)):
            return gr.Number(value=f.default, label=label, info=info)
        default = "" if f.default is dataclasses.MISSING else f.default
        return gr.Textbox(value=default, label=label, info=info or "empty: the model's middle block, all heads")

    def method_groups(names, initial):
        groups, inputs = [], []
        for name in names:
            with gr.Group(visible=name == initial) as group:
                for f in controls_of(name):
                    control = field_control(f, name)
                    inputs.append((name, f.name, control))
            groups.append(group)
        return groups, inputs

    def collect(method_name, entries, values):
        return {field: value for (name, field, _), value in zip(entries, values) if name == method_name}

    def guarded(fn):
        @functools.wraps(fn)
        def run(*args):
            try:
                return fn(*args)
            except ValueError as error:
                raise gr.Error(str(error)) from None
        return run

    with gr.Blocks(title="mmattn demo") as demo:
        gr.Markdown("# mmattn: training-free attention interventions\nBaseline and intervention from the same seed.")
        with gr.Tab("Generate"):
            with gr.Row():
                model = gr.Dropdown(list(GENERATION_MODELS), value=GENERATION_MODELS[0], label="model")
                prompt = gr.Textbox("a red circle left of a blue square", label="prompt", max_length=MAX_PROMPT)
            with gr.Row():
                seed = gr.Number(0, label="seed", precision=0)
                steps = gr.Slider(1, MAX_STEPS, value=20, step=1, label="steps")
                method = gr.Dropdown(GUIDANCE, value="softpag", label="method")
            groups, entries = method_groups(GUIDANCE, "softpag")
            window = gr.Number(0, label="window attention: kernel in tokens (0: off; image models)", precision=0)
            button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Row():
                baseline = gr.Image(label="baseline", type="filepath", elem_id="baseline")
                intervened = gr.Image(label="with the method", type="filepath", elem_id="intervened")
                footprint = gr.Image(label="window footprint (blue: centre token, orange: a corner token)",
                                     type="pil")
            summary = gr.Markdown(elem_id="generate-summary")
            method.change(lambda name: [gr.update(visible=n == name) for n in GUIDANCE], method, groups)

            def on_generate(model_id, text, seed_value, step_count, name, *values):
                *values, kernel = values
                return generate(model_id, text, seed_value, step_count, name, collect(name, entries, values), kernel)

            button.click(guarded(on_generate), [model, prompt, seed, steps, method, *[c for *_, c in entries], window],
                         [baseline, intervened, summary, footprint], api_name="generate")
        with gr.Tab("VQA"):
            with gr.Row():
                image = gr.Image(label="image (empty: a shapes-world scene from the seed)", type="pil",
                                 sources=["upload"])
                with gr.Column():
                    scene_seed = gr.Number(7, label="scene seed", precision=0)
                    question = gr.Textbox("what color is the circle", label="question", max_length=MAX_PROMPT)
                    vqa_method = gr.Dropdown(list(VQA_METHODS), value="fastv", label="method")
            vqa_groups, vqa_entries = method_groups(VQA_METHODS, "fastv")
            ask = gr.Button("Answer", variant="primary", elem_id="answer")
            with gr.Row():
                plain = gr.Textbox(label="baseline answer", elem_id="plain-answer")
                pruned = gr.Textbox(label="answer with the method", elem_id="pruned-answer")
                overlay = gr.Image(label="visual tokens pruned (dark) or sinks (red)", type="pil")
            vqa_summary = gr.Markdown()
            vqa_method.change(lambda name: [gr.update(visible=n == name) for n in VQA_METHODS], vqa_method, vqa_groups)

            def on_answer(picture, seed_value, text, name, *values):
                return answer(picture, seed_value, text, name, collect(name, vqa_entries, values))

            ask.click(guarded(on_answer), [image, scene_seed, question, vqa_method, *[c for *_, c in vqa_entries]],
                      [plain, pruned, overlay, vqa_summary], api_name="answer")
    demo.queue(default_concurrency_limit=1, max_size=8)
    return demo


def launch(host: str = "127.0.0.1", port: int | None = None, block: bool = True):
    """Build and serve the app; with ``block=False`` return it running in the background (tests)."""
    demo = build()
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True)
    return demo
