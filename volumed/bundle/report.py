"""The structured-report bundle (``bundles/volumed_report_ct``): segment, then report, as
``volumed report IMAGE -o OUT`` does.

The report is RadGPT's "segment first, then write": the bundle's network is the text-prompted
segmenter (the same ``network_def``, preprocessing, inferer and postprocessing as
``bundles/volumed_promptseg_ct``, all MONAI components or :mod:`volumed.bundle.promptseg`'s), and
its ``evaluator`` is :class:`ReportRunner`, which writes, for every image, what ``volumed report``
writes: the segmentation's files, ``report.txt``, ``report.json`` (each sentence linked to its
masks and measurements) and, for DICOM input, a TID 1500 DICOM SR referencing the DICOM SEG.

The learned report generator (:mod:`volumed.heads.report`, ``volumed train report``) is not what
this bundle runs: there are no paired CTs and reports here to train it on real data
(docs/reports.md), and a generated sentence cannot yet be linked to a mask.
"""

from __future__ import annotations

from pathlib import Path

from volumed.bundle.promptseg import PromptSegRunner

__all__ = ["ReportRunner"]


class ReportRunner(PromptSegRunner):
    """The ``evaluator`` of the report bundle: :class:`~volumed.bundle.promptseg.PromptSegRunner`'s
    arguments and checks, and for each image :func:`volumed.inference.reporting.write_report` with
    the config's predictor (network, preprocessing, inferer) and postprocessing.

    ``run()`` returns one :class:`volumed.inference.reporting.ReportResult` per image; its
    ``segmentation`` is the :class:`volumed.inference.segment.SegmentationResult`.
    """

    def _process(self, image: str, out: Path, options: dict):
        from volumed.inference.reporting import write_report

        options = dict(options)
        fixed = {name: options.pop(name) for name in ("model_dir", "overwrite", "progress", "all_terms", "dicom_uids")}
        return write_report(image, out, prompts=self.prompts, **fixed, **options)
