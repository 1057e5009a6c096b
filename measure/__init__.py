"""measure: OME-Zarr image + label image in, exact per-object features out, written as a cellar store.

    import measure
    result = measure.measure("slide.ome.zarr", "nuclei", "slide.cellar")
"""

from ngff import NgffImage, open_image
from measure.run import MeasureResult, measure

__all__ = ["MeasureResult", "NgffImage", "measure", "open_image"]
