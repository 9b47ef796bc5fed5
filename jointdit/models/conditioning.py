"""Conditions: the ``Condition`` batch, its learned embedding inside JointDiT, and a frozen open_clip encoder.

Split of responsibilities:
- :class:`ClipConditioner` (frozen, NOT part of JointDiT) turns captions and first frames into CLIP
  features. It can run once, at caching time, so training never needs CLIP.
- :class:`ConditionEmbedder` (``JointDiT.cond_embed``, trained and saved with the model) projects those
  features to the model width and owns the learned null embeddings used when a condition is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# --------------------------------------------------------------------------------------------------
# Condition batch
# --------------------------------------------------------------------------------------------------
@dataclass
class Condition:
    """CLIP features for a batch. Any field may be None (= absent → the learned null is used).

    text_tokens  [B, Lt, Dt]  CLIP text token features (after the final LayerNorm)
    text_pooled  [B, Dp]      CLIP pooled text embedding
    image        [B, Di]      CLIP image embedding of the first frame
    drop_text    [B] bool     True → this sample uses the learned null text (tokens and pooled)
    drop_image   [B] bool     True → this sample uses the learned null image

    Negative prompts are ordinary text in their own guidance branch. Per-sample drop flags let training
    dropout and every guidance branch share one batched forward.
    """

    text_tokens: Tensor | None = None
    text_pooled: Tensor | None = None
    image: Tensor | None = None
    drop_text: Tensor | None = None
    drop_image: Tensor | None = None

    @property
    def batch_size(self) -> int | None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                return v.shape[0]
        return None

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Condition:
        """Move every tensor to ``device``; cast the features (not the bool flags) to ``dtype``."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                v = v.to(device=device) if f.name.startswith("drop_") else v.to(device=device, dtype=dtype)
            out[f.name] = v
        return Condition(**out)

    def with_drop(self, text: bool | None = None, image: bool | None = None) -> Condition:
        """A copy with every sample's text and/or image dropped (True) or kept (False)."""
        b = self.batch_size
        if b is None:
            return replace(self)
        dev = next(getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None).device
        new = replace(self)
        if text is not None:
            new.drop_text = torch.full((b,), bool(text), device=dev)
        if image is not None:
            new.drop_image = torch.full((b,), bool(image), device=dev)
        return new

    def index(self, idx: Tensor | slice | Sequence[int]) -> Condition:
        """Select samples (rows) of every present field."""
        return Condition(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[idx])
                            for f in fields(self)})

    @staticmethod
    def cat(conds: Sequence[Condition]) -> Condition:
        """Concatenate along the batch. Where a part lacks a field that others have, its rows are
        zero-filled and flagged dropped, so they still get the learned null (what "absent" means)."""
        sizes = [c.batch_size for c in conds]
        if any(s is None for s in sizes):
            raise ValueError("Condition.cat needs every part to have at least one tensor (its batch size)")
        dev = next(getattr(c, f.name) for c in conds for f in fields(c) if getattr(c, f.name) is not None).device
        drop = {flag: [torch.zeros(n, dtype=torch.bool, device=dev) if getattr(c, flag) is None
                       else getattr(c, flag).to(dev).bool() for c, n in zip(conds, sizes)]
                for flag in ("drop_text", "drop_image")}
        out: dict[str, Tensor | None] = {}
        for name, flag in (("text_tokens", "drop_text"), ("text_pooled", "drop_text"), ("image", "drop_image")):
            present = [getattr(c, name) for c in conds]
            if all(p is None for p in present):
                out[name] = None
                continue
            like = next(p for p in present if p is not None)
            parts = []
            for i, (p, n) in enumerate(zip(present, sizes)):
                if p is None:
                    p = like.new_zeros((n, *like.shape[1:]))
                    drop[flag][i] = torch.ones(n, dtype=torch.bool, device=dev)
                parts.append(p)
            out[name] = torch.cat(parts)
        for flag in ("drop_text", "drop_image"):
            any_flag = any(getattr(c, flag) is not None for c in conds) or any(d.any() for d in drop[flag])
            out[flag] = torch.cat(drop[flag]) if any_flag else None
        return Condition(**out)


# --------------------------------------------------------------------------------------------------
# Learned condition embedding (lives in JointDiT as ``cond_embed``)
# --------------------------------------------------------------------------------------------------
def _mlp(in_dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, hidden))


class ConditionEmbedder(nn.Module):
    """CLIP features → (context tokens ``[B, Lt+1, D]``, pooled vector ``[B, D]``).

    context = LN([MLP_tok(text_tokens) | null_text_tokens ; MLP_img(image) | null_image_token])
    pooled  = MLP_pool(text_pooled) | null_text_pooled  +  MLP_imgpool(image) | null_image_pooled

    ``a | b`` picks b for samples whose condition is dropped or absent, so dropping is per sample and
    exact: a dropped sample's context is identical to a batch with no condition at all. The null text
    is a full learned sequence of ``text_len`` tokens, so the context length never depends on dropping.
    """

    def __init__(self, hidden_size: int, text_token_dim: int, text_pooled_dim: int, image_embed_dim: int,
                 text_len: int) -> None:
        super().__init__()
        self.text_len = text_len
        self.text_tokens = _mlp(text_token_dim, hidden_size)
        self.text_pooled = _mlp(text_pooled_dim, hidden_size)
        self.image_token = _mlp(image_embed_dim, hidden_size)
        self.image_pooled = _mlp(image_embed_dim, hidden_size)
        self.context_norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.null_text_tokens = nn.Parameter(torch.randn(text_len, hidden_size) * 0.02)
        self.null_image_token = nn.Parameter(torch.randn(1, hidden_size) * 0.02)
        # Zero null pooled vectors: a model with every condition dropped starts as an unconditional DiT.
        self.null_text_pooled = nn.Parameter(torch.zeros(hidden_size))
        self.null_image_pooled = nn.Parameter(torch.zeros(hidden_size))

    @property
    def num_tokens(self) -> int:
        return self.text_len + 1

    @staticmethod
    def _keep(flag: Tensor | None, b: int, device: torch.device) -> Tensor:
        if flag is None:
            return torch.ones(b, dtype=torch.bool, device=device)
        return ~flag.to(device=device, dtype=torch.bool).reshape(b)

    def forward(self, cond: Condition | None, batch_size: int, device: torch.device,
                dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        b, cond = batch_size, cond or Condition()
        keep_text = self._keep(cond.drop_text, b, device)                      # [B]
        keep_image = self._keep(cond.drop_image, b, device)                    # [B]

        null_tok = self.null_text_tokens.to(dtype).expand(b, -1, -1)           # [B, Lt, D]
        if cond.text_tokens is None:
            text = null_tok
        else:
            if cond.text_tokens.shape[1] != self.text_len:
                raise ValueError(
                    f"text_tokens has {cond.text_tokens.shape[1]} tokens but the model was built with "
                    f"text_len={self.text_len}; set model.text_len to the CLIP context length")
            text = torch.where(keep_text[:, None, None], self.text_tokens(cond.text_tokens.to(dtype)), null_tok)

        null_img = self.null_image_token.to(dtype).expand(b, -1, -1)           # [B, 1, D]
        if cond.image is None:
            img = null_img
        else:
            img = torch.where(keep_image[:, None, None], self.image_token(cond.image.to(dtype))[:, None], null_img)
        context = self.context_norm(torch.cat([text, img], dim=1))              # [B, Lt+1, D]

        pooled = self.null_text_pooled.to(dtype).expand(b, -1)                  # [B, D]
        if cond.text_pooled is not None:
            pooled = torch.where(keep_text[:, None], self.text_pooled(cond.text_pooled.to(dtype)), pooled)
        pooled_img = self.null_image_pooled.to(dtype).expand(b, -1)             # [B, D]
        if cond.image is not None:
            pooled_img = torch.where(keep_image[:, None], self.image_pooled(cond.image.to(dtype)), pooled_img)
        return context, pooled + pooled_img


# --------------------------------------------------------------------------------------------------
# Frozen open_clip encoder
# --------------------------------------------------------------------------------------------------
class ClipConditioner(nn.Module):
    """Frozen open_clip model: captions → (tokens ``[B, L, Dt]``, pooled ``[B, Dp]``); images → ``[B, Di]``.

    Args:
        model_name: any open_clip architecture name (built-in, or registered with
            ``open_clip.add_model_config``).
        pretrained: a local checkpoint path, an open_clip pretrained tag, or None (random weights).
        device: where the encoder runs.

    Text tokens are the last transformer layer's outputs after the final LayerNorm (what diffusion
    models usually cross-attend to); pooled text and image features are CLIP's projected embeddings,
    unnormalised.
    """

    def __init__(self, model_name: str = "ViT-B-32", pretrained: str | None = None,
                 device: str | torch.device = "cpu") -> None:
        super().__init__()
        import jointdit  # noqa: F401  (applies the torchvision fix before open_clip imports it)
        import open_clip

        if pretrained is not None and Path(str(pretrained)).expanduser().is_file():
            pretrained = str(Path(str(pretrained)).expanduser())
        self.model_name = model_name
        self.model = open_clip.create_model(model_name, pretrained=pretrained, device=device)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        pp = open_clip.get_model_preprocess_cfg(self.model)
        size = pp.get("size", 224)
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self.register_buffer("mean", torch.tensor(pp.get("mean", (0.48145466, 0.4578275, 0.40821073)))
                             .view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pp.get("std", (0.26862954, 0.26130258, 0.27577711)))
                             .view(1, 3, 1, 1), persistent=False)
        self.model.requires_grad_(False)
        self.eval()
        with torch.no_grad():
            tok, pooled = self.encode_text([""])
            img = self.encode_image(torch.zeros(1, 3, *self.image_size, device=self.mean.device))
        self.text_len, self.text_token_dim = tok.shape[1], tok.shape[2]
        self.text_pooled_dim, self.image_embed_dim = pooled.shape[1], img.shape[1]

    def train(self, mode: bool = True) -> ClipConditioner:  # frozen: always eval
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def model_kwargs(self) -> dict[str, int]:
        """The JointDiT config fields that must match this encoder."""
        return {"text_token_dim": self.text_token_dim, "text_pooled_dim": self.text_pooled_dim,
                "image_embed_dim": self.image_embed_dim, "text_len": self.text_len}

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        ids = self.tokenizer(list(texts)).to(self.device)                           # [B, L]
        out = self.model.forward_intermediates(text=ids, text_indices=1, normalize_intermediates=True,
                                               normalize=False)
        return out["text_intermediates"][-1].float(), out["text_features"].float()  # [B,L,Dt], [B,Dp]

    @torch.no_grad()
    def encode_image(self, images: Tensor) -> Tensor:
        """``images [B, 3, H, W]`` in [-1, 1] → ``[B, Di]``: resize shorter side, centre-crop, CLIP-normalise."""
        x = (images.to(self.device, torch.float32) + 1) / 2
        th, tw = self.image_size
        h, w = x.shape[-2:]
        s = max(th / h, tw / w)
        nh, nw = max(th, round(h * s)), max(tw, round(w * s))
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        top, left = (nh - th) // 2, (nw - tw) // 2
        x = x[..., top:top + th, left:left + tw].clamp(0, 1)
        return self.model.encode_image((x - self.mean) / self.std).float()

    @torch.no_grad()
    def encode(self, texts: Sequence[str] | None = None, images: Tensor | None = None,
               drop_text: Tensor | None = None, drop_image: Tensor | None = None) -> Condition:
        tokens = pooled = image = None
        if texts is not None:
            tokens, pooled = self.encode_text(texts)
        if images is not None:
            image = self.encode_image(images)
        return Condition(text_tokens=tokens, text_pooled=pooled, image=image, drop_text=drop_text,
                         drop_image=drop_image)
