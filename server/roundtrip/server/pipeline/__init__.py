"""The protocol-neutral pipeline under every door: the contract's checks and what a message
will hold, the byte budget, the queue's turns, the batcher, and the calls that own what
they take."""
