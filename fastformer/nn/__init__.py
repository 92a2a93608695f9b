"""Drop-in nn.Modules over the fused ops."""
