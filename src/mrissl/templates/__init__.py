"""Learnable modality templates (BrainMVP data distillation) and the downstream template mix.

BrainMVP learns one volume ``T_m`` per MRI modality, initialized to zero, by filling the masked
blocks of an input of modality ``m`` from ``T_m`` at the same place and reconstructing the
original (BrainMVP eq. 3):

    L_MD = ‖ F_dec(F_enc(Φ_distill(X_im, T_m))) − X_im ‖₂

so the gradient of the reconstruction loss reaches the template voxels that were used. Once
learned, the frozen templates replace some modalities of downstream cases (BrainMVP supplement
A): two copies ``X'``, ``X''`` with different modalities replaced feed the task loss, and an L2
term ties their features together (supplement eq. 7,
[`consistency_loss`][mrissl.losses.consistency_loss]).

* [`ModalityTemplates`][mrissl.templates.ModalityTemplates]: the learnable canvases, a
  crop-aware vectorised fill, optional safe normalization, their own learning rate, NIfTI
  export and import, and rebuilding from a checkpoint's ``state_dict``.
* [`template_fill`][mrissl.templates.template_fill] and
  [`crop_templates`][mrissl.templates.crop_templates]: the same fill as pure functions.
* [`TemplateMix`][mrissl.templates.TemplateMix]: the downstream augmentation (two views, a
  [`TemplateMixViews`][mrissl.templates.TemplateMixViews] of two
  [`MixedView`][mrissl.templates.MixedView]s).

Unlike the released code, the canvas has any shape you choose (160 × 192 × 160 holds a 1 mm
MNI-sized head), every crop names its offset in the canvas, and a zero template is never
divided by ~1e-9. The package (``_fill``: the crop gather and fill; ``modality``:
``ModalityTemplates``; ``mix``: ``TemplateMix``) depends on ``torch``, ``mrissl.masking``,
``mrissl.nn``, ``mrissl.modalities`` and the foundation modules; nibabel is imported only inside
[`to_nifti`][mrissl.templates.ModalityTemplates.to_nifti] and
[`from_nifti`][mrissl.templates.ModalityTemplates.from_nifti].
"""

from mrissl.templates._fill import crop_templates, template_fill
from mrissl.templates.mix import MixedView, TemplateMix, TemplateMixViews
from mrissl.templates.modality import ModalityTemplates

__all__ = [
    "MixedView",
    "ModalityTemplates",
    "TemplateMix",
    "TemplateMixViews",
    "crop_templates",
    "template_fill",
]
