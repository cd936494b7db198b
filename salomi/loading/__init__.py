from salomi.loading.models import DEFAULT_MODEL, Reference, block_linears, decoder_blocks, load_reference

__all__ = ["DEFAULT_MODEL", "Reference", "load_reference", "decoder_blocks", "block_linears"]
