"""Knowledge distillation: a student learns the next-token distribution of a frozen teacher.

    loss = kd_ratio * T^2 * D(teacher_T || student_T) + (1 - kd_ratio) * CE(labels) [+ hidden_weight * H]

The module composes its parts (as torchtune's KD recipe does) rather than subclassing the LM
stage: the student is `.model` (what the pipeline saves), the teacher a frozen `SlimPajamaModel`
held outside the module's registered children, so it is in neither `state_dict()` nor the
Lightning checkpoint nor the optimizer, and `LightningModule.train()` never flips it out of eval
mode. The losses are the pure functions of `slimpajama.losses`.

Placement: the teacher follows the student's device and dtype before every forward (Lightning moves
only registered modules). Under DDP every rank holds a full teacher copy (it has no gradients to
synchronise). Under FSDP the teacher is NOT sharded: each GPU holds a whole copy, which fits as long
as the teacher's weights fit one device beside the sharded student (see README, "Distillation").
"""

import logging
from pathlib import Path
from typing import Callable, Optional

import lightning as L
import torch
from torchmetrics import MeanMetric

from slimpajama.checks import is_finite_number
from slimpajama.losses import IGNORE_INDEX, check_kd_settings, hidden_state_loss, linear_cross_entropy, linear_distill_loss
from slimpajama.model import SlimPajamaConfig
from slimpajama.optim import FusedOptimizerClipping, lightning_optimizers
from slimpajama.pretrained import SlimPajamaModel
from slimpajama.registry import INPUTS, latest_model, resolve_model
from slimpajama.tokenizer import MODEL_FILE, SlimPajamaTokenizer

log = logging.getLogger(__name__)

STUDENT_INITS = ("scratch", "teacher_layers")  # or a model folder


def resolve_teacher(teacher: Optional[str], log_dir: Optional[str] = None) -> Path:
    """`teacher=null`: the newest finished pretrain model (`<log_dir>/latest/pretrain/model`);
    otherwise a model folder or a registered name (`slimpajama/pretrain`, ...)."""
    try:
        if teacher is None:
            return latest_model(INPUTS["distill"][1], log_dir=log_dir)
        return resolve_model(teacher, log_dir=log_dir)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"teacher={teacher}: {e}") from None


def every_other_layer(teacher: SlimPajamaModel) -> SlimPajamaModel:
    """A student of the teacher's width with layers 0, 2, 4, ... of the teacher, and its embeddings,
    final norm and head (DistilBERT's and DistilGPT2's initialisation)."""
    keep = list(range(0, teacher.config.n_layer, 2))
    config = SlimPajamaConfig.from_dict({**teacher.config.to_dict(), "n_layer": len(keep)})
    student = SlimPajamaModel(config)
    sd = {}
    for name, t in teacher.state_dict().items():
        if name.startswith("layers."):
            i, rest = name.removeprefix("layers.").split(".", 1)
            if int(i) % 2:
                continue
            name = f"layers.{int(i) // 2}.{rest}"
        sd[name] = t.detach().clone()
    student.load_state_dict(sd)
    return student


def _tokenizer_in(folder: Path) -> Optional[SlimPajamaTokenizer]:
    return SlimPajamaTokenizer.from_pretrained(folder) if (folder / MODEL_FILE).is_file() else None


def check_vocabularies(
    teacher: SlimPajamaModel, teacher_dir: Path, student: SlimPajamaModel, student_dir: Optional[Path],
    data_tokenizer: Optional[SlimPajamaTokenizer],
) -> None:
    """Teacher, student and data must share one tokenizer: the same vocabulary size for both models and
    the data's tokenizer, and the same tokenizer file (fingerprint) wherever a folder carries one.
    Raises ValueError naming every vocabulary and which ones differ."""
    entries = [  # (what, vocabulary size, fingerprint or None)
        (f"teacher model ({teacher_dir / 'config.json'} vocab_size)", teacher.config.vocab_size, None),
        ("student model (" + (f"{student_dir / 'config.json'}" if student_dir else "the `model` group, data.vocab_size")
         + " vocab_size)", student.config.vocab_size, None),
    ]
    teacher_tok = _tokenizer_in(teacher_dir)
    if teacher_tok is not None:
        entries.append((f"teacher tokenizer ({teacher_dir / MODEL_FILE})", teacher_tok.vocab_size, teacher_tok.fingerprint()))
    if student_dir is not None and (tok := _tokenizer_in(student_dir)) is not None:
        entries.append((f"student tokenizer ({student_dir / MODEL_FILE})", tok.vocab_size, tok.fingerprint()))
    if data_tokenizer is not None:
        entries.append(("data tokenizer (the `data` group: data.tokenizer_path or trained on data.paths)",
                        data_tokenizer.vocab_size, data_tokenizer.fingerprint()))
    elif teacher_tok is None:
        log.warning("neither the data nor %s has a tokenizer: only vocabulary sizes are compared", teacher_dir)
    sizes = {size for _, size, _ in entries}
    prints = {fp for _, _, fp in entries if fp is not None}
    if len(sizes) > 1 or len(prints) > 1:
        listing = "\n".join(f"  {what}: {size} tokens" + (f", fingerprint {fp}" if fp else "") for what, size, fp in entries)
        differ = "vocabulary sizes differ" if len(sizes) > 1 else "same sizes but different tokenizers (fingerprints differ)"
        raise ValueError(
            f"teacher and student must share one tokenizer, but the {differ}:\n{listing}\n"
            f"Tokenize the data with the teacher's tokenizer (data.tokenizer_path={teacher_dir}) and give the "
            "student the same vocabulary (student.init=teacher_layers, or a `model` whose vocab_size is the teacher's)."
        )


class DistillationModule(FusedOptimizerClipping, L.LightningModule):
    def __init__(
        self,
        model: SlimPajamaConfig,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Optional[Callable[[torch.optim.Optimizer], object]] = None,
        teacher: Optional[str] = None,
        student_init: str = "scratch",
        temperature: float = 2.0,
        kd_ratio: float = 0.5,
        kind: str = "forward_kl",
        hidden_loss: Optional[str] = None,
        hidden_weight: float = 1.0,
        log_dir: Optional[str] = None,
    ):
        """model: the student's architecture when student_init=scratch; teacher: a model folder or a
        registered name (None: the newest finished pretrain run under log_dir); student_init: scratch |
        teacher_layers | a model folder; temperature, kd_ratio, kind: the KD term (see losses.kd_loss);
        hidden_loss: None | cosine | mse on the final hidden states, through a learned projection when
        the widths differ, weighted by hidden_weight."""
        super().__init__()
        check_kd_settings(temperature, kd_ratio, kind, "stage.module")
        if not is_finite_number(hidden_weight):
            raise ValueError(f"stage.module.hidden_weight={hidden_weight!r} must be a finite number")
        if hidden_weight < 0:
            raise ValueError(f"stage.module.hidden_weight={hidden_weight} must be >= 0 (a negative weight pushes "
                             "the hidden states apart)")
        if hidden_loss not in (None, "cosine", "mse"):
            raise ValueError(f"stage.module.hidden_loss={hidden_loss!r}: null, cosine or mse")
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.temperature, self.kd_ratio, self.kind = float(temperature), float(kd_ratio), kind
        self.hidden_loss, self.hidden_weight = hidden_loss, float(hidden_weight)
        self.teacher_name, self.log_dir = teacher, log_dir
        try:  # now, so that the checkpoint names the folder itself (a resume keeps it)
            self._teacher_dir: Optional[Path] = resolve_teacher(teacher, log_dir)
        except FileNotFoundError:
            self._teacher_dir = None  # the error is raised where the teacher is loaded
        self._student_dir: Optional[Path] = None

        if not isinstance(student_init, str) or not student_init:
            raise ValueError(f"student.init={student_init!r}: give one of {', '.join(STUDENT_INITS)}, or a model "
                             "folder or registered name")
        if student_init == "scratch":
            self.model = SlimPajamaModel(model)
        elif student_init == "teacher_layers":
            self._load_teacher()  # the student is cut from it
            self.model = every_other_layer(self._teacher).train()
            log.info("student: layers 0, 2, 4, ... of the teacher (%d of %d), the `model` group is not used",
                     self.model.config.n_layer, self._teacher.config.n_layer)
        else:
            try:
                self._student_dir = resolve_model(student_init, log_dir=log_dir)
            except FileNotFoundError as e:
                raise FileNotFoundError(f"student.init={student_init}: not one of {', '.join(STUDENT_INITS)} "
                                        f"and not a model: {e}") from None
            self.model = SlimPajamaModel.from_pretrained(self._student_dir).train()
            log.info("student: initialised from %s, the `model` group is not used", self._student_dir)
        # plain types only: checkpoints load with torch.load(weights_only=True); the teacher is a path
        self.save_hyperparameters({
            "model": self.model.config.to_dict(), "teacher": teacher, "student_init": student_init,
            "teacher_dir": str(self._teacher_dir.resolve()) if self._teacher_dir else None,  # not latest/
            "temperature": self.temperature, "kd_ratio": self.kd_ratio, "kind": kind,
            "hidden_loss": hidden_loss, "hidden_weight": self.hidden_weight,
        })
        self.hidden_proj: Optional[torch.nn.Linear] = None  # created in setup once the teacher's width is known
        self.val_loss = MeanMetric()
        self.teacher_val_loss = MeanMetric()
        self.teacher_measured = False

    # ---- the teacher ----------------------------------------------------------------------
    def _load_teacher(self) -> None:
        if "_teacher" in self.__dict__:
            return
        self._teacher_dir = self._teacher_dir or resolve_teacher(self.teacher_name, self.log_dir)
        teacher = SlimPajamaModel.from_pretrained(self._teacher_dir).eval().requires_grad_(False)
        # outside nn.Module's registry: not a child, so not in state_dict, the checkpoint or .parameters()
        self.__dict__["_teacher"] = teacher
        log.info("teacher: %s (%.2fM parameters, %d layers, width %d)", self._teacher_dir, teacher.num_params() / 1e6,
                 teacher.config.n_layer, teacher.config.d_model)

    @property
    def teacher(self) -> SlimPajamaModel:
        """The frozen teacher, on the student's device and in its dtype."""
        teacher = self.__dict__.get("_teacher")
        if teacher is None:
            raise RuntimeError("the teacher is loaded in setup(): call trainer.fit / validate first")
        p = self.model.lm_head.weight
        if teacher.lm_head.weight.device != p.device or teacher.lm_head.weight.dtype != p.dtype:
            teacher.to(device=p.device, dtype=p.dtype)
        return teacher

    def setup(self, stage: str) -> None:
        """Before any training step: load the teacher and check that teacher, student and data share
        one tokenizer (the datamodule is set up by now)."""
        self._load_teacher()
        teacher = self.__dict__["_teacher"]
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        check_vocabularies(teacher, self._teacher_dir, self.model, self._student_dir,
                           getattr(datamodule, "tokenizer", None))
        seq_len = getattr(datamodule, "seq_len", None)
        if seq_len is not None and seq_len > teacher.config.max_seq_len:
            raise ValueError(f"data.seq_len={seq_len} exceeds the teacher's max_position_embeddings="
                             f"{teacher.config.max_seq_len} ({self._teacher_dir / 'config.json'})")
        d_s, d_t = self.model.config.d_model, teacher.config.d_model
        if self.hidden_loss and d_s != d_t and self.hidden_proj is None:
            self.hidden_proj = torch.nn.Linear(d_s, d_t, bias=False, device=self.model.lm_head.weight.device)
            log.info("hidden-state loss through a learned %d -> %d projection", d_s, d_t)

    # ---- steps ----------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def _losses(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = batch.long()
        x, y = batch[:, :-1], batch[:, 1:]  # (B, T) inputs and next-token targets
        teacher = self.teacher
        with torch.no_grad():
            h_t = teacher(x, apply_head=False)  # (B, T, d_t) final normed hidden states
        h = self.model(x, apply_head=False)  # (B, T, d)
        out = linear_distill_loss(h, self.model.lm_head.weight, h_t, teacher.lm_head.weight, y,
                                  kd_ratio=self.kd_ratio, temperature=self.temperature, kind=self.kind)
        losses = {"loss": out.loss, "ce": out.ce, "kd": out.kd}
        if self.hidden_loss:
            hp = self.hidden_proj(h) if self.hidden_proj is not None else h
            losses["hidden"] = hidden_state_loss(hp, h_t, y != IGNORE_INDEX, self.hidden_loss)
            losses["loss"] = losses["loss"] + self.hidden_weight * losses["hidden"]
        return losses

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        losses = self._losses(batch)
        self.log("train/loss", losses["loss"], prog_bar=True)
        self.log("distill/kd_loss", losses["kd"], prog_bar=True)
        self.log("distill/ce_loss", losses["ce"])
        if "hidden" in losses:
            self.log("distill/hidden_loss", losses["hidden"])
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return losses["loss"]

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        batch = batch.long()
        x, y = batch[:, :-1], batch[:, 1:]
        loss = linear_cross_entropy(self.model(x, apply_head=False), self.model.lm_head.weight, y)
        self.val_loss.update(loss, weight=y.numel())  # mean over tokens, not batches
        if not self.teacher_measured and not self.trainer.sanity_checking:  # the teacher on the same batches, once
            teacher = self.teacher
            t_loss = linear_cross_entropy(teacher(x, apply_head=False), teacher.lm_head.weight, y)
            self.teacher_val_loss.update(t_loss, weight=y.numel())

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        self.log("val/ppl", torch.exp(loss), prog_bar=True, sync_dist=False)
        if not self.teacher_measured and not self.trainer.sanity_checking:
            t_loss = self.teacher_val_loss.compute()
            self.teacher_val_loss.reset()
            self.log("teacher/val_loss", t_loss, sync_dist=False)
            self.log("teacher/val_ppl", torch.exp(t_loss), sync_dist=False)
            log.info("teacher: val loss %.4f, perplexity %.2f", float(t_loss), float(torch.exp(t_loss)))
            self.teacher_measured = True

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer.zero_grad(set_to_none=True)  # free the gradients before the next forward (as the LM stage)

    def configure_optimizers(self):
        # the student and, with a hidden-state loss across widths, the projection; never the teacher
        return lightning_optimizers(self, self.optimizer_factory, self.scheduler_factory)
