"""Circuit discovery on the probe: tasks, activation and path patching, EAP / EAP-IG, ACDC,
discrete-SAE circuits, the ``Circuit`` result type and comparisons."""
from .acdc import acdc_edges, acdc_nodes
from .circuit import Circuit, from_head_scores
from .compare import overlap, roc_auc, spearman
from .eap import attribute, eap, eap_ig
from .patching import patch_heads, patch_mlps, path_patch
from .sae import sae_circuit
from .tasks import TASKS, Task, TaskNotSolved, colored_objects, greater_than, ioi, make_task

METHODS = ("patching", "path", "eap", "eap-ig", "acdc", "sae")

__all__ = ["Circuit", "METHODS", "TASKS", "Task", "TaskNotSolved", "acdc_edges", "acdc_nodes", "attribute",
           "colored_objects", "eap", "eap_ig", "from_head_scores", "greater_than", "ioi", "make_task", "overlap",
           "patch_heads", "patch_mlps", "path_patch", "roc_auc", "sae_circuit", "spearman"]
