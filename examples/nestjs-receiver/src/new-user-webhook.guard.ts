import { CanActivate, ExecutionContext, Injectable, UnauthorizedException } from '@nestjs/common';
import { Webhook, WebhookVerificationError } from 'standardwebhooks';
import type { RawBodyRequest } from '@nestjs/common';
import type { Request } from 'express';

/** Accepts a request only with the right X-API-Key: the check a backend's auth middleware already does. */
@Injectable()
export class ApiKeyGuard implements CanActivate {
  private readonly apiKey = process.env.API_KEY ?? '';

  canActivate(context: ExecutionContext): boolean {
    const request = context.switchToHttp().getRequest<Request>();
    if (!this.apiKey || request.header('x-api-key') !== this.apiKey) {
      throw new UnauthorizedException('invalid API key');
    }
    return true;
  }
}

/**
 * When WEBHOOK_SECRET (whsec_…, the value of pg_new_user_hook.signing_secret) is set,
 * accepts a request only with a valid Standard Webhooks signature over the raw body,
 * made less than five minutes ago.
 */
@Injectable()
export class WebhookSignatureGuard implements CanActivate {
  private readonly webhook = process.env.WEBHOOK_SECRET ? new Webhook(process.env.WEBHOOK_SECRET) : null;

  canActivate(context: ExecutionContext): boolean {
    if (!this.webhook) {
      return true;
    }
    const request = context.switchToHttp().getRequest<RawBodyRequest<Request>>();
    const headers = {
      'webhook-id': request.header('webhook-id') ?? '',
      'webhook-timestamp': request.header('webhook-timestamp') ?? '',
      'webhook-signature': request.header('webhook-signature') ?? '',
    };
    try {
      this.webhook.verify(request.rawBody ?? Buffer.alloc(0), headers);
    } catch (e) {
      if (e instanceof WebhookVerificationError) {
        throw new UnauthorizedException(`invalid signature: ${e.message}`);
      }
      throw e;
    }
    return true;
  }
}
