"""A mixin that turns a test's stand-in input rotation (``rotate`` / ``unrotate``) into a :class:`cq.state.Basis`."""


class OneSidedBasis:
    """``W' = rotate(W)``; activations rotate the same way (ComfyUI applies it only when ``native``)."""

    native = False

    def to_working(self, w):
        return self.rotate(w)

    def to_original(self, w):
        return self.unrotate(w)

    def hessian_to_working(self, h):
        return self.unrotate(self.unrotate(h).T).T  # Rᵀ H R

    def hessian_to_original(self, h):
        return self.rotate(self.rotate(h).T).T  # R H Rᵀ

    def activations(self, x):
        return self.rotate(x)
