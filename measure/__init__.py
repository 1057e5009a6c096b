"""measure: OME-Zarr image + label image in, exact per-object features out, written as a cellar store.

    from cellar import measure
    result = measure.measure("slide.ome.zarr", "nuclei", "slide.cellar")
"""

from ..ngff import NgffImage, open_image
from .run import MeasureResult, measure, measure_many

__all__ = ["MeasureResult", "NgffImage", "measure", "measure_many", "open_image"]
