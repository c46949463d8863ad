"""The demo's Gradio page, built on the framework-free :mod:`freecure.demo.service`.

In: reference photo(s) or the bundled example, the prompt (its attributes shown while typing),
backend, method, steps, seed, γ, guidance, injection step. Out: per-stage progress, FD | PD |
FreeCure, the merged mask on PD, per-attribute masks and attention maps, the attribute and stage
tables and a zip of the run's folder. Bad input or a failed run shows its message in the page's
status line (``#status``), which stays until the next run (no pop-up that fades, no "Error"
badges). Gradio's queue (concurrency 1) runs one generation at a time and shows later users their
place. Run folders are served from where they were written (not copied) and removed, with the
session's uploads, once no page shows them (:class:`freecure.demo.service.DemoFiles`).
"""

from __future__ import annotations

import argparse
import html
import logging
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no telemetry
import gradio as gr  # noqa: E402

from ..backends import BACKENDS  # noqa: E402
from ..core.errors import FreeCureError, InputError
from .methods import METHODS  # noqa: E402
from .service import (
    MAX_PAGE_PROMPT_CHARS,
    MAX_STEPS,
    MAX_UPLOAD_BYTES,
    DemoFiles,
    Runner,
    backend_trigger,
    check_request,
    page_controls,
    preview_attributes,
    zip_folder,
)

logger = logging.getLogger(__name__)

EXAMPLE_PROMPT = "a woman with red hair, laughing happily"
# Gradio's own sweep of its cache (every hour, what is older than a day): uploads no run used
# and no page holds would otherwise wait for the exit.
CACHE_SWEEP = (3600, 24 * 3600)
CSS = """
.fc-table { border-collapse: collapse; width: 100%; font-size: 0.9em; }
.fc-table th, .fc-table td { border-bottom: 1px solid #ddd; padding: 2px 8px; text-align: left; }
.fc-chip { display: inline-block; border-radius: 10px; padding: 1px 8px; margin: 2px; background: #e8eefc; }
.fc-chip.abstract { background: #fdeede; }
.fc-error { color: #b00020; }
.fc-warning { color: #8a5a00; }
"""


def find_example() -> Path | None:
    """``examples/astronaut.png`` of a source checkout, if there is one."""
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "examples" / "astronaut.png"
        if candidate.is_file():
            return candidate
    return None


def _escape(value: Any) -> str:
    return html.escape(str(value))


def attributes_html(preview: dict[str, Any]) -> str:
    """The live attribute preview: one chip per attribute with its kind, the unknown words, or the error."""
    if not preview["ok"]:
        return f'<div class="fc-error">{_escape(preview["error"])}</div>'
    chips = "".join(
        f'<span class="fc-chip {_escape(a["kind"])}">{_escape(a["text"])} · {_escape(a["kind"])}</span>'
        for a in preview["attributes"]
    )
    parts = [f'<div class="fc-attributes">subject: <b>{_escape(preview["class_word"])}</b> {chips}</div>']
    if not preview["attributes"]:
        parts.append('<div class="fc-warning">no attribute FreeCure knows: nothing to cure</div>')
    if preview["unknown_words"]:
        parts.append(
            f'<div class="fc-unknown">words FreeCure does not know (left to the model): '
            f"{_escape(', '.join(preview['unknown_words']))}</div>"
        )
    return "".join(parts)


def attribute_table_html(attributes: dict[str, Any]) -> str:
    rows = "".join(
        f'<tr class="fc-attribute"><td>{_escape(a["text"])}</td><td>{_escape(a["kind"])}</td>'
        f"<td>{_escape(a.get('category') or '')}</td><td>{_escape(', '.join(a.get('parse_classes') or []))}</td></tr>"
        for a in attributes["attributes"]
    )
    return (
        '<table class="fc-table fc-attribute-table"><thead><tr><th>attribute</th><th>kind</th>'
        f"<th>category</th><th>face-parser classes</th></tr></thead><tbody>{rows}</tbody></table>"
    )


def stage_table_html(stages) -> str:
    rows = []
    for stage in stages:
        state = "ran" if stage["ran"] else f"skipped: {stage['reason']}"
        seconds = f"{stage['seconds']:.2f} s" if stage["ran"] else ""
        calls = str(stage["unet_calls"]) if stage["ran"] else ""
        rows.append(
            f'<tr class="fc-stage" data-stage="{_escape(stage["name"])}"><td>{_escape(stage["name"])}</td>'
            f"<td>{_escape(state)}</td><td>{seconds}</td><td>{calls}</td></tr>"
        )
    return (
        '<table class="fc-table fc-stage-table"><thead><tr><th>stage</th><th>state</th><th>time</th>'
        f"<th>UNet calls</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def notes_html(notes) -> str:
    return "".join(f'<div class="fc-warning fc-note">⚠ {_escape(note)}</div>' for note in notes)


def _form_value(value: Any) -> str:
    """A Gradio control's value as the form text :func:`check_request` reads ("" when left empty)."""
    if value is None or value == "":
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) < 2**53 else str(value)
    return str(value)


def upload_paths(paths) -> list[Path]:
    return [Path(getattr(path, "name", path)) for path in paths or []]


def read_uploads(paths) -> list[tuple[str, bytes]]:
    uploads = []
    for path in upload_paths(paths):
        try:
            if path.stat().st_size > MAX_UPLOAD_BYTES:
                raise InputError(f"{path.name} is larger than {MAX_UPLOAD_BYTES // 2**20} MB; upload a smaller photo")
            uploads.append((path.name, path.read_bytes()))
        except FileNotFoundError:
            raise InputError(f"{path.name} is no longer on the server (uploads expire); upload it again") from None
    return uploads


def status_html(message: str) -> str:
    """The status line: what went wrong in the last run, until the next one ("" after a good run)."""
    return f'<div class="fc-error fc-status-error" role="alert">{_escape(message)}</div>'


def backend_guidance(name: str) -> float | None:
    value = getattr(BACKENDS[name], "default_guidance_scale", None)
    return value if isinstance(value, float) else None  # a property: known once loaded


def backend_controls(args: argparse.Namespace):
    """One group of controls per backend, drawn from its declared options (``Backend.options``;
    files and folders stay the server's): ({backend: group}, [(backend, option, control)]). Only
    the chosen backend's group is shown; each control starts at the server's value."""
    groups, controls = {}, []
    for name, backend in sorted(BACKENDS.items()):
        with gr.Group(visible=name == args.backend, elem_id=f"options-{name}") as group:
            for option in page_controls(backend):
                value = getattr(args, option.dest, option.default)
                label = f"{option.flag.lstrip('-')}: {option.help}" if option.help else option.flag.lstrip("-")
                elem_id = f"option-{name}-{option.dest}"
                if option.control == "switch":
                    control = gr.Checkbox(bool(value), label=label, elem_id=elem_id)
                elif option.control == "choice":
                    control = gr.Dropdown(list(option.choices), value=value, label=label, elem_id=elem_id)
                elif option.control == "number":
                    low, high = option.bounds
                    integer = getattr(option.type, "number", float) is int
                    control = gr.Number(
                        value, label=label, minimum=low, maximum=high, precision=0 if integer else None, elem_id=elem_id
                    )
                else:
                    control = gr.Textbox("" if value is None else str(value), label=label, elem_id=elem_id)
                controls.append((name, option, control))
        groups[name] = group
    return groups, controls


def create_app(
    args: argparse.Namespace,
    workdir: Path,
    example: Path | None = None,
    preload: bool = True,
    files: DemoFiles | None = None,
) -> gr.Blocks:
    """The demo page for the ``freecure demo`` options ``args``; run outputs go under ``workdir``.
    ``preload`` loads ``args.backend``'s models in the background right away. ``files`` says
    which files the demo made and removes them when no page needs them (default: only the run
    folders under ``workdir``)."""
    files = files or DemoFiles(workdir)
    runner = Runner(args, workdir, preload=args.backend if preload else None, files=files)
    gr.set_static_paths([str(Path(workdir).resolve())])  # results are served from their run folder, not copied

    def session(request: gr.Request | None) -> str:
        return getattr(request, "session_hash", None) or "-"

    def preview(prompt: str, backend: str) -> str:
        return attributes_html(preview_attributes(prompt or "", backend_trigger(args, backend)))

    def guidance_placeholder(backend: str) -> str:
        value = args.guidance_scale if args.guidance_scale is not None else backend_guidance(backend)
        return f"empty: the backend's own ({value})" if value is not None else "empty: the backend's own"

    def on_backend(prompt: str, backend: str):
        return preview(prompt, backend), gr.update(placeholder=guidance_placeholder(backend))

    def hold_uploads(uploads, request: gr.Request):
        files.hold(session(request), "uploads", upload_paths(uploads))

    def end_session(request: gr.Request):
        files.end(session(request))

    def run(values: dict, request: gr.Request, progress=gr.Progress()):  # noqa: B008 (Gradio injects progress so)
        """One run from the page; ``values``: every input component's value (Gradio passes a dict
        when the inputs are a set, which lets the backends' generated controls come in too)."""
        uploads, chosen = values[references], values[backend]
        form = {
            "prompt": values[prompt] or "",
            "backend": chosen or "",
            "method": values[method] or "",
            "steps": _form_value(values[steps]),
            "seed": _form_value(values[seed]),
            "gamma": _form_value(values[gamma]),
            "guidance_scale": _form_value(values[guidance]),
            "inject_step": _form_value(values[inject_step]),
            "use_example": "1" if values[use_example] else "0",
        }
        for owner, option, control in controls:  # the chosen backend's generated controls
            if owner == chosen:
                form[f"option:{option.dest}"] = _form_value(values[control])
        files.hold(session(request), "uploads", upload_paths(uploads))
        result = None
        try:
            checked = check_request(form, read_uploads(uploads), example, args)

            def report(stage: str, done: int, total: int) -> None:
                progress((done, total) if total else None, desc=f"{stage}: step {done}/{total}" if total else stage)

            result = runner.run(checked, report)
            archive = zip_folder(result, checked)
        except Exception as error:  # the message stays in the status line until the next run
            if result is not None:
                files.release(result.folders)
            if isinstance(error, FreeCureError):
                message = str(error)
            else:  # one line on the page; the traceback in the server log
                logger.exception("demo run failed")
                message = f"internal error ({type(error).__name__}: {error}); see the server log"
            return (*[gr.skip()] * (len(outputs) - 1), status_html(message))
        files.hold(session(request), "run", result.folders)  # lets go of this page's previous run
        files.sweep()
        gallery = [(str(result.out_dir / name), caption) for caption, name in result.attribute_files]
        return (
            str(result.path("fd.png")),
            str(result.path("pd.png")),
            str(result.path("freecure.png")),
            None if result.path("mask_overlay.png") is None else str(result.path("mask_overlay.png")),
            gallery,
            attribute_table_html(result.attributes),
            stage_table_html(result.stages),
            notes_html(result.notes),
            str(archive),
            "",  # a good run clears the status line
        )

    backends = sorted(BACKENDS)
    with gr.Blocks(title="FreeCure demo", analytics_enabled=False, delete_cache=CACHE_SWEEP) as demo:
        gr.Markdown(
            "# FreeCure\nUpload a face, type a prompt, compare the foundation model (FD), the personalized "
            "model (PD) and FreeCure, which restores the attributes PD dropped."
            + (" **--tiny: tiny random-weight components; the images are noise.**" if args.tiny else "")
        )
        with gr.Row():
            with gr.Column(scale=1):
                references = gr.File(
                    label="reference photo(s) of one identity",
                    file_count="multiple",
                    type="filepath",
                    elem_id="references",
                )
                use_example = gr.Checkbox(
                    value=example is not None,
                    interactive=example is not None,
                    label="use the bundled example (examples/astronaut.png) when nothing is uploaded",
                    elem_id="use-example",
                )
                prompt = gr.Textbox(
                    label=f"prompt (at most {MAX_PAGE_PROMPT_CHARS:,} characters)",
                    placeholder=EXAMPLE_PROMPT,
                    max_length=MAX_PAGE_PROMPT_CHARS,
                    elem_id="prompt",
                )
                attributes = gr.HTML(preview("", args.backend), elem_id="attributes")
                backend = gr.Dropdown(backends, value=args.backend, label="backend", elem_id="backend")
                method = gr.Dropdown(
                    [(m.title, m.name) for m in METHODS.values()],
                    value=next(iter(METHODS)),
                    label="method",
                    elem_id="method",
                )
                with gr.Row():
                    steps = gr.Number(
                        args.steps, label="steps", precision=0, minimum=2, maximum=MAX_STEPS, elem_id="steps"
                    )
                    seed = gr.Number(0, label="seed", precision=0, minimum=0, elem_id="seed")
                    gamma = gr.Number(
                        args.gamma, label="γ (expression)", minimum=0, maximum=1, step=0.05, elem_id="gamma"
                    )
                with gr.Row():
                    # text, not gr.Number: empty means "the backend's own", which a number field cannot say
                    guidance = gr.Textbox(
                        "" if args.guidance_scale is None else str(args.guidance_scale),
                        label="guidance",
                        placeholder=guidance_placeholder(args.backend),
                        elem_id="guidance",
                    )
                    inject_step = gr.Textbox(
                        "" if args.inject_step is None else str(args.inject_step),
                        label="identity injection step",
                        placeholder="empty: the backend's own",
                        elem_id="inject-step",
                    )
                with gr.Accordion("backend options", open=False, elem_id="backend-options"):
                    groups, controls = backend_controls(args)
                run_button = gr.Button("Run", variant="primary", elem_id="run")
            with gr.Column(scale=2):
                status = gr.HTML(elem_id="status")  # the last run's error, until the next run
                with gr.Row():
                    image = {"type": "filepath", "interactive": False, "height": 220}
                    fd = gr.Image(label="FD (foundation)", elem_id="fd", **image)
                    pd = gr.Image(label="PD (personalized)", elem_id="pd", **image)
                    cured = gr.Image(label="FreeCure", elem_id="freecure", **image)
                    overlay = gr.Image(label="merged mask on PD", elem_id="overlay", **image)
                maps = gr.Gallery(label="per-attribute masks and attention maps", columns=4, height=280, elem_id="maps")
                notes = gr.HTML(elem_id="notes")
                attribute_table = gr.HTML(elem_id="attribute-table")
                stage_table = gr.HTML(elem_id="stages")
                download = gr.File(label="download: the folder `freecure generate` writes", elem_id="download")

        prompt.change(preview, [prompt, backend], attributes, queue=False, show_progress="hidden")
        backend.change(on_backend, [prompt, backend], [attributes, guidance], queue=False, show_progress="hidden")
        names = list(groups)
        backend.change(
            lambda chosen: [gr.update(visible=name == chosen) for name in names],
            backend,
            [groups[name] for name in names],
            queue=False,
            show_progress="hidden",
        )
        references.change(hold_uploads, references, None, queue=False, show_progress="hidden")
        outputs = [fd, pd, cured, overlay, maps, attribute_table, stage_table, notes, download, status]
        run_button.click(
            run,
            {
                references,
                use_example,
                prompt,
                backend,
                method,
                steps,
                seed,
                gamma,
                guidance,
                inject_step,
                *[component for _, _, component in controls],
            },
            outputs,
            show_progress="full",
        )
        demo.unload(end_session)  # a closed or reloaded page: its uploads and run folders go
    demo.queue(default_concurrency_limit=1)  # one generation at a time; Gradio shows later users their place
    demo.freecure_runner = runner
    demo.freecure_files = files
    return demo


def launch(demo: gr.Blocks, host: str, port: int, allowed_paths: list[str]) -> None:
    """Serve the page on ``host:port``: no share link, no telemetry, errors shown on the page,
    uploads over :data:`~freecure.demo.service.MAX_UPLOAD_BYTES` refused by the server."""
    demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        show_error=True,
        quiet=True,
        max_file_size=MAX_UPLOAD_BYTES,
        ssr_mode=False,  # no Node server
        prevent_thread_lock=True,
        allowed_paths=allowed_paths,
        footer_links=["gradio"],
        css=CSS,
    )
