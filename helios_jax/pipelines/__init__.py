"""helios_jax.pipelines: HeliosPipeline (plain, Helios-Base) and HeliosPyramidPipeline (Mid, Distilled)."""

from helios_jax.pipelines.base import HeliosPipelineOutput
from helios_jax.pipelines.noise import JaxNoiseSource, ReplayNoiseSource
from helios_jax.pipelines.plain import HeliosPipeline
from helios_jax.pipelines.prompts import PromptSchedule
from helios_jax.pipelines.pyramid import HeliosPyramidPipeline
from helios_jax.pipelines.stream import HeliosStream, StreamChunk, StreamClosedError

__all__ = ["HeliosPipeline", "HeliosPyramidPipeline", "HeliosPipelineOutput", "HeliosStream", "JaxNoiseSource",
           "PromptSchedule", "ReplayNoiseSource", "StreamChunk", "StreamClosedError"]
