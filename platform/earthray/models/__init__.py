"""Parts the recipes share: per-sensor patch embeddings, timm backbones, masking, decoders, MoE,
meta-modality attention, temporal fusion, geo prototypes, contrastive losses, EMA teachers, task heads,
initial weights from local timm files."""

from earthray.models.backbones import SwinEncoder, ViTEncoder
from earthray.models.contrastive import DINOHead, DINOLoss, cgcl_loss, cluster_assignment, info_nce
from earthray.models.decoders import MAEDecoder, SimMIMDecoder
from earthray.models.ema import ema_update_, frozen_copy
from earthray.models.geo_prototypes import GeoPrototypes, region_index, sinkhorn
from earthray.models.heads import ChangeHead, ClassificationHead, FPNHead, create_head, fuse_sensors
from earthray.models.masking import random_masking, simmim_mask
from earthray.models.meta_attention import MetaModalityAttention
from earthray.models.moe import MoEFFN, convert_swin_mlp_to_moe, moe_aux_loss
from earthray.models.patch_embed import MultiSensorPatchEmbed, SensorPatchEmbed
from earthray.models.pretrained import WeightsError, load_strict, load_timm_swinv2, read_weights
from earthray.models.temporal import TemporalFusion

__all__ = [
    "ChangeHead", "ClassificationHead", "DINOHead", "DINOLoss", "FPNHead", "GeoPrototypes", "MAEDecoder", "MetaModalityAttention", "MoEFFN",
    "MultiSensorPatchEmbed", "SensorPatchEmbed", "SimMIMDecoder", "SwinEncoder", "TemporalFusion", "ViTEncoder",
    "cgcl_loss", "cluster_assignment", "create_head", "convert_swin_mlp_to_moe", "ema_update_", "frozen_copy", "info_nce",
    "fuse_sensors", "moe_aux_loss", "random_masking", "region_index", "simmim_mask", "sinkhorn",
    "WeightsError", "load_strict", "load_timm_swinv2", "read_weights",
]
