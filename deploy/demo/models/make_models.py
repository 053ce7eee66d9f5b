#!/usr/bin/env python3
"""Writes the demo's STL models (ASCII STL, a few KB each) into this directory:

- cube.stl: a 20 mm cube, valid; slices in well under a second;
- pyramid.stl: a square pyramid, 30 mm base, 20 mm high, valid;
- broken.stl: not a mesh at all (an upload gone wrong): admesh refuses it;
- oversized.stl: a valid 900 mm cube, larger than the printer's bed: admesh accepts
  it, the slicer fails (prusa-slicer aborts: "Objects could not fit on the bed").
"""
from pathlib import Path

HERE = Path(__file__).resolve().parent


def solid(name, triangles):
    out = [f"solid {name}"]
    for a, b, c in triangles:
        out += ["facet normal 0 0 0", " outer loop"]
        out += [f"  vertex {x} {y} {z}" for x, y, z in (a, b, c)]
        out += [" endloop", "endfacet"]
    out.append(f"endsolid {name}")
    return "\n".join(out) + "\n"


def cube(s):
    v = [(x, y, z) for x in (0, s) for y in (0, s) for z in (0, s)]
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    return [t for a, b, c, d in quads for t in ((v[a], v[b], v[c]), (v[a], v[c], v[d]))]


def pyramid(base, height):
    p = [(0, 0, 0), (base, 0, 0), (base, base, 0), (0, base, 0)]
    top = (base / 2, base / 2, height)
    sides = [(p[i], p[(i + 1) % 4], top) for i in range(4)]
    return sides + [(p[0], p[2], p[1]), (p[0], p[3], p[2])]


if __name__ == "__main__":
    (HERE / "cube.stl").write_text(solid("cube", cube(20)))
    (HERE / "pyramid.stl").write_text(solid("pyramid", pyramid(30, 20)))
    (HERE / "oversized.stl").write_text(solid("oversized", cube(900)))
    (HERE / "broken.stl").write_text("this upload is not a 3D model\n")
