"""learnsteps' ComfyUI nodes, in ComfyUI's V3 node API (comfy_api.latest, as its built-in sigma and sampler nodes).
Imported by ComfyUI only (through the custom_nodes/learnsteps folder that `python -m learnsteps.interop.comfyui
install COMFYUI_DIR` writes); schedule files go in ComfyUI/models/learnsteps/.

    Load learnsteps schedule     MODEL, file, steps -> SIGMAS   (for SamplerCustom / SamplerCustomAdvanced)
    learnsteps sampler           file -> SAMPLER                (the file's solver, LD3 times and tables included)
    learnsteps exact timesteps   MODEL -> MODEL                 (discrete models called at fractional timesteps)
"""
from __future__ import annotations

import logging
import os

import comfy.samplers
import folder_paths
from comfy_api.latest import ComfyExtension, io

from ...schedule import load_schedule
from . import load_sigmas
from .sampler import exact_timesteps, sampler_function

FOLDER = "learnsteps"
if FOLDER not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths[FOLDER] = ([os.path.join(folder_paths.models_dir, FOLDER)], {".json"})


def _path(name: str) -> str:
    return folder_paths.get_full_path_or_raise(FOLDER, name)


def _files(tooltip: str) -> io.Combo.Input:
    return io.Combo.Input("schedule", options=folder_paths.get_filename_list(FOLDER), tooltip=tooltip)


class LoadLearnstepsSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LearnstepsLoadSchedule", display_name="Load learnsteps schedule",
            category="sampling/custom_sampling/schedulers",
            description="The sigmas of a learnsteps schedule file (checksum and model checked), in the connected "
                        "model's convention.",
            inputs=[io.Model.Input("model"),
                    _files("a learnsteps schedule file in models/learnsteps"),
                    io.Int.Input("steps", default=0, min=0, max=1000,
                                 tooltip="0: the file's own steps; another number re-spaces the list (not learned)")],
            outputs=[io.Sigmas.Output()],
        )

    @classmethod
    def execute(cls, model, schedule, steps) -> io.NodeOutput:
        sigmas, warnings = load_sigmas(_path(schedule), model.get_model_object("model_sampling"), steps)
        for w in warnings:
            logging.warning(f"learnsteps: {w}")
        return io.NodeOutput(sigmas)


class LearnstepsSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LearnstepsSampler", display_name="learnsteps sampler",
            category="sampling/custom_sampling/samplers",
            description="Runs a learnsteps schedule file's solver as learnsteps does (LD3's evaluation times and "
                        "learned coefficient tables included); connect 'Load learnsteps schedule' as the sigmas.",
            inputs=[_files("the same schedule file as 'Load learnsteps schedule'"),
                    io.Boolean.Input("exact_timesteps", default=True,
                                     tooltip="call discrete models at the file's fractional timesteps (ComfyUI "
                                             "rounds them to whole ones otherwise)")],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, schedule, exact_timesteps) -> io.NodeOutput:
        fn = sampler_function(load_schedule(_path(schedule)), exact_timesteps,
                              warn=lambda w: logging.warning(f"learnsteps: {w}"))
        return io.NodeOutput(comfy.samplers.KSAMPLER(fn))


class LearnstepsExactTimesteps(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LearnstepsExactTimesteps", display_name="learnsteps exact timesteps",
            category="advanced/model",
            description="A discrete (SD1/SDXL-type) model that takes fractional timesteps instead of rounding each "
                        "sigma to a whole one, so that ComfyUI's own samplers run learned schedules exactly.",
            inputs=[io.Model.Input("model")],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        patched = model.clone()
        patched.add_object_patch("model_sampling", exact_timesteps(model.get_model_object("model_sampling")))
        return io.NodeOutput(patched)


class LearnstepsExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LoadLearnstepsSchedule, LearnstepsSampler, LearnstepsExactTimesteps]


async def comfy_entrypoint() -> LearnstepsExtension:
    return LearnstepsExtension()
