"""viewer: `cellar view`, a local web viewer of an image with its measured objects (PathViewer-style).

- `viewer.session`: one table of a store with its image; view states (a filter and a colouring made into
  per-label colours, named by a token);
- `viewer.sql`: the sandbox in which the page's SQL runs (read-only, no files, no extensions, time and row
  limits);
- `viewer.tiles`: the deep-zoom tile pyramids of the image and of the objects' overlay;
- `viewer.server`: the Starlette app and its uvicorn server (`serve`, used by `cellar view`);
- `viewer/static`: the page, with its script bundled from `viewer/frontend` (OpenSeadragon included).
"""
