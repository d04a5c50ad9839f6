"""A small live plot of training loss and per-level validation Dice, drawn with QPainter (no plotting dependency)."""

from __future__ import annotations

from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QFont, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget

LEVEL_COLOURS = ["#e66101", "#fdb863", "#b2abd2", "#5e3c99", "#1b9e77", "#66a61e"]


class TrainingPlot(QWidget):
    """Loss per step (grey, left axis, own scale) and validation Dice per level (colours, right axis, 0..1)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setMinimumHeight(170)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.clear()

    def clear(self) -> None:
        """Forget all points."""
        self.loss: list[tuple[int, float]] = []
        self.val: list[tuple[int, dict[int, float]]] = []
        self.update()

    def add_loss(self, step: int, loss: float) -> None:
        """Add the training loss of ``step``."""
        self.loss.append((step, float(loss)))
        self.update()

    def add_validation(self, step: int, scores: dict[int, float]) -> None:
        """Add the per-level validation Dice of ``step``."""
        self.val.append((step, dict(scores)))
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt's name
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        w, h = self.width(), self.height()
        left, right, top, bottom = 36, 40, 18, 20
        area = QRectF(left, top, max(w - left - right, 10), max(h - top - bottom, 10))
        p.fillRect(self.rect(), QColor("#262930"))
        p.setPen(QPen(QColor("#5a5f6b"), 1))
        p.drawRect(area)
        font = QFont(p.font())
        font.setPointSizeF(max(7.0, font.pointSizeF() * 0.8))
        p.setFont(font)
        text = QColor("#c8ccd4")
        p.setPen(text)
        if not self.loss and not self.val:
            p.drawText(area, Qt.AlignmentFlag.AlignCenter, "loss and validation Dice appear here")
            p.end()
            return
        steps = [s for s, _ in self.loss] + [s for s, _ in self.val]
        smax = max(max(steps), 1)
        lmax = max((v for _, v in self.loss), default=1.0) * 1.05 or 1.0

        def xy(step: float, frac: float) -> QPointF:
            return QPointF(area.left() + area.width() * step / smax, area.bottom() - area.height() * frac)

        # axes labels
        p.drawText(QRectF(0, top - 6, left - 4, 14), Qt.AlignmentFlag.AlignRight, f"{lmax:.2f}")
        p.drawText(QRectF(0, area.bottom() - 8, left - 4, 14), Qt.AlignmentFlag.AlignRight, "0")
        p.drawText(QRectF(area.right() + 4, top - 6, right, 14), Qt.AlignmentFlag.AlignLeft, "1.0")
        p.drawText(QRectF(area.right() + 4, area.bottom() - 8, right, 14), Qt.AlignmentFlag.AlignLeft, "0")
        p.drawText(
            QRectF(area.left(), area.bottom() + 2, area.width(), 16),
            Qt.AlignmentFlag.AlignCenter,
            f"step (last {smax})",
        )
        # grid at Dice 0.5 / 0.8 / 0.9
        p.setPen(QPen(QColor("#3b3f48"), 1, Qt.PenStyle.DashLine))
        for g in (0.5, 0.8, 0.9):
            p.drawLine(xy(0, g), xy(smax, g))
        # loss, smoothed over a few steps
        if self.loss:
            vals = [v for _, v in self.loss]
            k = max(1, len(vals) // 60)
            smooth = [sum(vals[max(0, i - k) : i + 1]) / len(vals[max(0, i - k) : i + 1]) for i in range(len(vals))]
            p.setPen(QPen(QColor("#9aa0aa"), 1.5))
            p.drawPolyline(QPolygonF([xy(s, v / lmax) for (s, _), v in zip(self.loss, smooth)]))
        # validation Dice per level
        levels = sorted({lv for _, sc in self.val for lv in sc})
        for lv in levels:
            pts = [xy(s, sc[lv]) for s, sc in self.val if lv in sc]
            colour = QColor(LEVEL_COLOURS[(lv - 1) % len(LEVEL_COLOURS)])
            p.setPen(QPen(colour, 2))
            if len(pts) > 1:
                p.drawPolyline(QPolygonF(pts))
            for pt in pts:
                p.drawEllipse(pt, 2.5, 2.5)
        # legend
        x = area.left() + 4
        p.setPen(QColor("#9aa0aa"))
        p.drawText(QPointF(x, top - 5), "loss")
        x += 34
        for lv in levels:
            p.setPen(QColor(LEVEL_COLOURS[(lv - 1) % len(LEVEL_COLOURS)]))
            last = next((sc[lv] for _, sc in reversed(self.val) if lv in sc), None)
            label = f"L{lv} {last:.3f}" if last is not None else f"L{lv}"
            p.drawText(QPointF(x, top - 5), label)
            x += 64
        p.end()
