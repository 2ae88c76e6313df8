"""helios_jax.pipelines: HeliosPipeline (plain, Helios-Base) and HeliosPyramidPipeline (Mid, Distilled)."""

from helios_jax.pipelines.base import HeliosPipelineOutput
from helios_jax.pipelines.noise import JaxNoiseSource, ReplayNoiseSource
from helios_jax.pipelines.plain import HeliosPipeline
from helios_jax.pipelines.pyramid import HeliosPyramidPipeline

__all__ = ["HeliosPipeline", "HeliosPyramidPipeline", "HeliosPipelineOutput", "JaxNoiseSource", "ReplayNoiseSource"]
