"""Attention processors and the context managers that install and restore them: FD's attention capture
(UNet cross-attention, FLUX joint attention) and FASA's foundation-aware attention. Imports only from core."""
