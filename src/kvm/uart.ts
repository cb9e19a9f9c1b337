// An 8250/16550 UART at COM1 for a Linux guest: the registers its early console and its
// full 8250 driver touch (THR/RBR, IER, IIR/FCR, LCR, MCR, LSR, MSR, SCR, the divisor latch),
// transmitting each byte at once. Interrupts (transmitter empty) go out on IRQ 4.
// Register layout: the 16550 data sheet; Linux's include/uapi/linux/serial_reg.h.

export const COM1 = 0x3f8;
export const COM1_IRQ = 4;

const IER_THRI = 0x02; // transmitter holding register empty interrupt
const IIR_NO_INT = 0x01;
const IIR_THRI = 0x02;
const IIR_FIFO_ENABLED = 0xc0;
const FCR_ENABLE_FIFO = 0x01;
const LCR_DLAB = 0x80;
const MCR_LOOP = 0x10;
const LSR_THRE = 0x20; // transmitter holding register empty
const LSR_TEMT = 0x40; // transmitter empty
// Modem status as an attached terminal shows it: DCD, DSR, CTS.
const MSR_IDLE = 0xb0;

export class Uart8250 {
  private ier = 0;
  private lcr = 0;
  private mcr = 0;
  private scr = 0;
  private fcr = 0;
  private dll = 0x0c; // 9600 baud, as firmware leaves it
  private dlm = 0;
  /** A transmitter-empty interrupt is owed (cleared by reading IIR or writing THR). */
  private threPending = false;

  constructor(
    private readonly transmit: (byte: number) => void,
    private readonly pulseIrq: () => void,
  ) {}

  /** A read of COM1 + `offset` (0-7). */
  read(offset: number): number {
    const dlab = (this.lcr & LCR_DLAB) !== 0;
    switch (offset) {
      case 0:
        return dlab ? this.dll : 0; // nothing is ever received
      case 1:
        return dlab ? this.dlm : this.ier;
      case 2: {
        const fifo = this.fcr & FCR_ENABLE_FIFO ? IIR_FIFO_ENABLED : 0;
        if (this.threPending) {
          this.threPending = false;
          return fifo | IIR_THRI;
        }
        return fifo | IIR_NO_INT;
      }
      case 3:
        return this.lcr;
      case 4:
        return this.mcr;
      case 5:
        return LSR_THRE | LSR_TEMT;
      case 6:
        // In loopback the modem outputs (DTR, RTS, OUT1, OUT2) read back as DSR, CTS, RI, DCD:
        // the 8250 driver's probe checks exactly that.
        if (this.mcr & MCR_LOOP) return ((this.mcr & 0x01) << 5) | ((this.mcr & 0x02) << 3) | ((this.mcr & 0x04) << 4) | ((this.mcr & 0x08) << 4);
        return MSR_IDLE;
      default:
        return this.scr;
    }
  }

  /** A write of `value` to COM1 + `offset` (0-7). */
  write(offset: number, value: number): void {
    const dlab = (this.lcr & LCR_DLAB) !== 0;
    switch (offset) {
      case 0:
        if (dlab) this.dll = value;
        else {
          if (!(this.mcr & MCR_LOOP)) this.transmit(value);
          this.transmitterEmpty(); // sent at once
        }
        return;
      case 1:
        if (dlab) {
          this.dlm = value;
          return;
        }
        {
          const was = this.ier & IER_THRI;
          this.ier = value & 0x0f;
          if (!was && this.ier & IER_THRI) this.transmitterEmpty(); // THR is empty right now
        }
        return;
      case 2:
        this.fcr = value;
        return;
      case 3:
        this.lcr = value;
        return;
      case 4:
        this.mcr = value & 0x1f;
        return;
      case 7:
        this.scr = value;
        return;
      default:
        return; // LSR and MSR are read-only
    }
  }

  private transmitterEmpty(): void {
    if (!(this.ier & IER_THRI)) return;
    this.threPending = true;
    this.pulseIrq();
  }
}
