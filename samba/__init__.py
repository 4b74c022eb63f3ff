"""Samba: Mamba language models with sparse hidden states and a dense state readout."""
