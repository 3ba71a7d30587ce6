"""tuneserve: fine-tune open models with LoRA on Ray, then serve them with vLLM, on Kubernetes."""

API_GROUP = "tuneserve.dev"
API_VERSION = "v1alpha1"
FIELD_MANAGER = "tuneserve-operator"
