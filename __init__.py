"""ComfyUI entry point of the NSARM node pack (clone this repository into ComfyUI/custom_nodes)."""
# ComfyUI imports this file as a package. Tools that import it as a lone module (pytest collecting
# a checkout whose folder name is not a valid package name, e.g. `nsarm-comfyui`) get no nodes.
if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
