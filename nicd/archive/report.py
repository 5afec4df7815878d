"""``nicd report``: what the archive saves, per folder and in total, from the figures the daemon stored.

One *image* is one stored bitstream (one distinct content). An image is counted once, in the folder
of the first file recorded with its content (lowest ``files.id``) among the selected files, so the
folder rows add up exactly to the total, and the total of a report without a path equals the sums
over the ``bitstreams`` table (a bitstream with no file row left is listed under the folder
``"(no file recorded)"``).

Per group (each folder, and the total):

- ``images``, ``pixels``, ``original_bytes`` (the original files), ``nicd_bytes`` (the bitstreams);
- ``jpeg_bytes_at_equal_ssim``: the bytes JPEG needs to reach the SSIM nicd reached on each image,
  measured by the daemon when it coded the image; ``jpeg_images`` counts the images that have that
  figure (JPEG may never reach a very high SSIM);
- ``savings_vs_original`` = 1 - nicd_bytes / original_bytes and ``savings_vs_jpeg`` = 1 - (nicd bytes
  of the images with a JPEG figure) / jpeg_bytes_at_equal_ssim, both fractions (None when undefined);
- ``bpp`` (nicd bits per pixel), ``jpeg_bpp`` (over the images with a JPEG figure), and the plain
  means of ``psnr`` (dB), ``ssim`` and ``ms_ssim`` over the images that have each figure (MS-SSIM
  needs a short side above 160 px).

:func:`plot` draws every image as two points, nicd and JPEG at the same SSIM (bpp on x, SSIM on y),
to a PNG (matplotlib's Agg canvas: no display, no global backend change), written atomically.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

from sqlalchemy import select

from ..config import Config
from ..store.models import Bitstream, File
from . import Reader, normalize_path, path_filter

__all__ = ["NO_FILE_FOLDER", "Group", "Report", "report", "plot"]

NO_FILE_FOLDER = "(no file recorded)"


@dataclass
class Group:
    images: int = 0
    pixels: int = 0
    original_bytes: int = 0
    nicd_bytes: int = 0
    jpeg_images: int = 0
    jpeg_bytes_at_equal_ssim: int = 0
    _nicd_bytes_with_jpeg: int = 0
    _sums: dict = field(default_factory=lambda: {"psnr": [0.0, 0], "ssim": [0.0, 0], "ms_ssim": [0.0, 0]})

    def add(self, img: dict) -> None:
        self.images += 1
        self.pixels += img["pixels"]
        self.original_bytes += img["original_bytes"]
        self.nicd_bytes += img["nicd_bytes"]
        if img["jpeg_bytes_at_equal_ssim"] is not None:
            self.jpeg_images += 1
            self.jpeg_bytes_at_equal_ssim += img["jpeg_bytes_at_equal_ssim"]
            self._nicd_bytes_with_jpeg += img["nicd_bytes"]
        for k, acc in self._sums.items():
            v = img.get(k)
            if v is not None:
                acc[0] += v
                acc[1] += 1

    def to_dict(self) -> dict:
        def frac(a: int, b: int):
            return None if not b else 1.0 - a / b

        def mean(k: str):
            s, n = self._sums[k]
            return s / n if n else None

        return {
            "images": self.images,
            "pixels": self.pixels,
            "original_bytes": self.original_bytes,
            "nicd_bytes": self.nicd_bytes,
            "jpeg_bytes_at_equal_ssim": self.jpeg_bytes_at_equal_ssim,
            "jpeg_images": self.jpeg_images,
            "savings_vs_original": frac(self.nicd_bytes, self.original_bytes),
            "savings_vs_jpeg": frac(self._nicd_bytes_with_jpeg, self.jpeg_bytes_at_equal_ssim),
            "bpp": self.nicd_bytes * 8 / self.pixels if self.pixels else None,
            "jpeg_bpp": None,  # filled in by Report (needs the pixels of the images with a JPEG figure)
            "mean_psnr": mean("psnr"),
            "mean_ssim": mean("ssim"),
            "mean_ms_ssim": mean("ms_ssim"),
        }


@dataclass
class Report:
    database: str
    path: str | None
    total: dict
    folders: list[dict]
    points: list[dict]  # one per image: path, bpp, jpeg_bpp, ssim, psnr

    def to_dict(self, *, points: bool = False) -> dict:
        d = {"database": self.database, "path": self.path, **self.total, "total": dict(self.total),
             "folders": self.folders}
        if points:
            d["images_detail"] = self.points
        return d


def _rows(reader: Reader, path: str | None) -> list:
    cols = (File.id, File.path, Bitstream.content_sha256, Bitstream.width, Bitstream.height,
            Bitstream.original_bytes, Bitstream.nicd_bytes, Bitstream.jpeg_bytes_at_equal_ssim,
            Bitstream.psnr, Bitstream.ssim, Bitstream.ms_ssim)

    def q(conn):
        if path is None:
            stmt = select(*cols).select_from(Bitstream).outerjoin(File, File.content_sha256 == Bitstream.content_sha256)
        else:
            stmt = (select(*cols).select_from(Bitstream).join(File, File.content_sha256 == Bitstream.content_sha256)
                    .where(path_filter(File.path, path, reader.dialect)))
        return conn.execute(stmt.order_by(Bitstream.content_sha256, File.id)).all()

    return reader.run(q)


def report(config: Config, path: str | os.PathLike | None = None) -> Report:
    """The report of everything stored (or of the files at or under ``path``). A database not created
    yet gives an empty report."""
    where = normalize_path(path) if path is not None else None
    with Reader(config) as reader:
        rows = _rows(reader, where) if reader.exists else []
        database = reader.database

    images: dict[str, dict] = {}
    for r in rows:
        sha = r.content_sha256
        if sha in images:  # ordered by file id within a content: the first row is the primary file
            continue
        images[sha] = {
            "path": r.path,
            "folder": os.path.dirname(r.path) if r.path else NO_FILE_FOLDER,
            "pixels": int(r.width) * int(r.height),
            "original_bytes": int(r.original_bytes),
            "nicd_bytes": int(r.nicd_bytes),
            "jpeg_bytes_at_equal_ssim": None if r.jpeg_bytes_at_equal_ssim is None else int(r.jpeg_bytes_at_equal_ssim),
            "psnr": r.psnr,
            "ssim": r.ssim,
            "ms_ssim": r.ms_ssim,
        }

    total = Group()
    groups: dict[str, Group] = {}
    jpeg_pixels: dict[str, int] = {}
    points = []
    for img in images.values():
        total.add(img)
        groups.setdefault(img["folder"], Group()).add(img)
        if img["jpeg_bytes_at_equal_ssim"] is not None:
            jpeg_pixels[img["folder"]] = jpeg_pixels.get(img["folder"], 0) + img["pixels"]
        px = img["pixels"] or 1
        points.append({
            "path": img["path"],
            "bpp": img["nicd_bytes"] * 8 / px,
            "jpeg_bpp": None if img["jpeg_bytes_at_equal_ssim"] is None else img["jpeg_bytes_at_equal_ssim"] * 8 / px,
            "ssim": img["ssim"],
            "psnr": img["psnr"],
        })

    def finish(g: Group, jp: int) -> dict:
        d = g.to_dict()
        d["jpeg_bpp"] = g.jpeg_bytes_at_equal_ssim * 8 / jp if jp else None
        return d

    folders = []
    for name in sorted(groups):
        folders.append({"folder": name, **finish(groups[name], jpeg_pixels.get(name, 0))})
    tot = finish(total, sum(jpeg_pixels.values()))
    tot["folder_count"] = len(folders)
    points.sort(key=lambda p: p["path"] or "")
    return Report(database=database, path=where, total=tot, folders=folders, points=points)


def plot(rep: Report, file: str | os.PathLike) -> str:
    """Draw bpp against SSIM for every image, nicd and JPEG at equal SSIM, to a PNG. Returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..errors import StorageError
    from ..fsutil import atomic_write_bytes

    pts = [p for p in rep.points if p["ssim"] is not None]
    fig = Figure(figsize=(7, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    pairs = [p for p in pts if p["jpeg_bpp"] is not None]
    for p in pairs:
        ax.plot([p["bpp"], p["jpeg_bpp"]], [p["ssim"], p["ssim"]], color="0.8", linewidth=0.6, zorder=1)
    ax.scatter([p["bpp"] for p in pts], [p["ssim"] for p in pts], s=14, color="tab:blue", label="nicd", zorder=2)
    if pairs:
        ax.scatter([p["jpeg_bpp"] for p in pairs], [p["ssim"] for p in pairs], s=14, color="tab:orange",
                   marker="s", label="JPEG at equal SSIM", zorder=2)
    ax.set_xlabel("bits per pixel")
    ax.set_ylabel("SSIM")
    t = rep.total
    sv = t.get("savings_vs_jpeg")
    title = f"{t['images']} images"
    if sv is not None:
        title += f": nicd needs {abs(sv):.0%} {'fewer' if sv >= 0 else 'more'} bytes than JPEG at equal SSIM"
    ax.set_title(title, fontsize=10)
    if not pts:
        ax.text(0.5, 0.5, "no images", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(loc="best")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    target = normalize_path(file)
    try:
        atomic_write_bytes(target, buf.getvalue())
    except OSError as exc:
        raise StorageError(f"cannot write the plot {target}: {exc.strerror or exc}", path=target) from None
    return target
